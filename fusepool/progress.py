"""Progress on a terminal for commands that can run longer than a couple of seconds.

Drawn on stderr only when it is a terminal (and not where the output itself
goes to that terminal), so scripts and pipes see nothing; redrawn at most
every 0.2 s; the line is finished when the work ends, on errors too.
"""

import sys
import time

INTERVAL = 0.2  # seconds between redraws


class ByteCounter:
    """A binary output that passes everything through and, if ``show``, tells how much went by."""

    def __init__(self, out, label: str, show: bool, stream=None):
        self.out, self.label, self.show = out, label, show
        self.stream = stream or sys.stderr
        self.written = 0
        self._drawn = 0.0

    def write(self, data) -> int:
        n = self.out.write(data)
        self.written += len(data)
        if self.show:
            now = time.monotonic()
            if now - self._drawn >= INTERVAL:
                self._drawn = now
                self._draw()
        return n

    def _draw(self) -> None:
        self.stream.write(f"\r{self.label}: {self.written / (1 << 20):,.1f} MiB written ")
        self.stream.flush()

    def __enter__(self) -> "ByteCounter":
        return self

    def __exit__(self, *exc) -> None:
        if self._drawn:  # finish the line; the last figure stays on screen
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def counting(out, label: str) -> ByteCounter:
    """``out`` with progress on stderr when that is a terminal that ``out`` is not."""
    to_terminal = out is sys.stdout.buffer and sys.stdout.isatty()
    return ByteCounter(out, label, show=sys.stderr.isatty() and not to_terminal)
