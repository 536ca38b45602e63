"""The ``fusepool`` command.

- :mod:`~fusepool.cli.table`: the subcommands as data (name, help, arguments,
  handler); :mod:`~fusepool.cli.parser` builds argparse parsers from it;
- :mod:`~fusepool.cli.dispatch`: the one place that decides whether a command
  runs through the mount daemon (control socket, volume data through the mount)
  or on the pool opened here (under its lock); both run :mod:`fusepool.commands`;
- handlers, one module per group: :mod:`~fusepool.cli.pools`,
  :mod:`~fusepool.cli.volumes`, :mod:`~fusepool.cli.images`,
  :mod:`~fusepool.cli.daemon`;
- output formatting, one module per report: :mod:`~fusepool.cli.volume_tables`
  (list, thin_ls, map), :mod:`~fusepool.cli.info_block` (docker info),
  :mod:`~fusepool.cli.check_report`, :mod:`~fusepool.cli.output` (JSON, tables).

Errors print one line on stderr and exit 1 (operation failed) or 2 (usage
error).  Heavy modules (trio, pyfuse3, the engine) and the handler modules are
imported only by the command that needs them, so short commands start fast.
"""

import os
import re
import sys

from fusepool.cli.parser import build_parser
from fusepool.errors import PoolError

__all__ = ["build_parser", "format_info", "fsync_path", "main", "pool_call", "process_alive"]


# Names tests and tools import from here: module and name, loaded only when asked for
# (start-up time).
_EXPORTS = {
    "pool_call": ("dispatch", "call"),
    "fsync_path": ("dispatch", "fsync_path"),
    "format_info": ("info_block", "format_info"),
    "process_alive": ("daemon", "process_alive"),
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(f"fusepool.cli.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    # Second line of defence for "every file of a pool is owner-only": whatever a
    # code path forgets to chmod is created without group/other bits (a stricter
    # umask is kept).
    os.umask(os.umask(0o077) | 0o077)
    argv = sys.argv[1:] if argv is None else argv
    if "resize" in argv and any(re.match(r"^-\d", x) for x in argv[argv.index("resize") + 1 :]):
        # argparse would take "-1G" for an option and print a confusing message
        print("fusepool: error: volumes cannot shrink: resize takes SIZE or +SIZE", file=sys.stderr)
        return 2
    command = next((x for x in argv if not x.startswith("-")), None)
    parser = build_parser(only=command)
    if command not in parser.commands:
        parser = build_parser()  # no command, or an unknown one: argparse lists them all
    args = parser.parse_args(argv)
    daemon = args.command in ("mount", "serve")
    if daemon or args.debug or not args.func.command.light:
        import logging  # (not for light commands: it costs start-up time)

        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s"
                            if daemon else "fusepool: %(message)s")
        if not daemon:
            logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed stdout shows here, not in the interpreter's last flush
    except BrokenPipeError:
        if not stdout_closed():
            print("fusepool: error: broken pipe", file=sys.stderr)
            return 1
        return die_of_sigpipe()
    except PoolError as exc:
        print(f"fusepool: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"fusepool: error: {exc.strerror or exc}"
              + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    return status or 0


def stdout_closed() -> bool:
    """True when nothing reads our stdout any more (the reader of a pipe is gone)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def die_of_sigpipe() -> int:
    """End as coreutils do when their reader goes (``seq 100000 | head -1``): silently,
    killed by SIGPIPE, so a shell sees status 141.

    Python ignores SIGPIPE and raises BrokenPipeError instead; stdout goes to
    /dev/null first so that the interpreter's final flush cannot complain either.
    """
    import signal

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.stderr.flush()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE  # (not reached: the signal ends the process)
