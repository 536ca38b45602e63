"""Numbers into text: tables, medians, ratios, percentiles, target verdicts."""

import statistics

from .env import GiB, MiB

SAME = 0.10  # two figures within 10 % of each other count as the same


def percentile(samples: list[float], pct: float) -> float:
    """The nearest-rank percentile: with fewer than 100 samples, p99 is the largest one."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100), at least 1
    return ordered[int(rank) - 1]


def ratios(mine: dict, theirs: dict) -> dict:
    """fusepool's figure divided by the peer's, figure by figure (latencies: lower is better)."""
    from .workloads import FIGURES

    return {f: (mine[f] / theirs[f] if theirs[f] else None) for f in FIGURES}


def print_table(rows: list[tuple], aligns: str) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [str(c).ljust(w) if a == "l" else str(c).rjust(w)
                 for c, w, a in zip(row, widths, aligns, strict=False)]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def num(value: float | None, digits: int = 0) -> str:
    """``digits`` decimals below 100, none above (3 significant figures are all a noisy run has)."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.{digits}f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def median_ms(samples: list[float]) -> str:
    return ms(statistics.median(samples))


def verdict(checks: list[dict]) -> str:
    if not checks:
        return "-"
    missed = [c for c in checks if not c["ok"]]
    return "ok" if not missed else "MISSED " + "; ".join(c["what"].split(" ", 1)[1] for c in missed)


def mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB" if n < GiB else f"{n / GiB:,.2f} GiB"


def size_text(n: float) -> str:
    return f"{n / GiB:,.1f} GiB" if n >= GiB else f"{n / MiB:,.0f} MiB"


def ratio_text(a: float, b: float) -> str:
    """How a compares with b, in words: "1.8x faster", "about the same"."""
    if not a or not b:
        return "not comparable"
    r = a / b
    if abs(r - 1) <= SAME:
        return "about the same"
    return f"{r:.1f}x" if r > 1 else f"{1 / r:.1f}x less"
