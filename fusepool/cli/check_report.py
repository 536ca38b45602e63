"""``check``'s text report, and the progress line long offline walks draw on a terminal."""

import sys


def print_report(report: dict, pool: str) -> None:
    print(f"transaction {report['transaction']}: {report['devices']} devices, {report['nodes']} "
          f"node pages, {report['mappings']} mappings, {report['used_blocks']} of "
          f"{report['data_blocks']} data blocks in use")
    for note in report["notes"]:
        print(f"note: {note}")
    for p in report["problems"]:
        print(f"{'error' if p['fatal'] else 'leak'}: {p['kind']}: {p['message']}")
    print("clean" if report["ok"] else f"{len(report['problems'])} problem(s) found; "
          f"`fusepool repair {pool}` rebuilds what can be rebuilt")


def progress_bar(label: str):
    """A progress callback drawing on stderr when it is a terminal (else silent)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        text = f"{done}/{total}" if total else f"{done}"
        sys.stderr.write(f"\r{label}: {text} pages read ")
        sys.stderr.flush()

    return show
