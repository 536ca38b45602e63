"""Helpers shared by the benchmark scripts in tools/ (tools/bench, tools/bench-metadata).

Only what more than one script needs lives here; each script documents its own method.
"""

import random

BLOCK = 64 << 10  # the `fusepool init` default block size
POPULATE_STEP = 50_000  # mappings per _remap call: bounds the list built at once


def populate(pool, name: str, n: int, block_size: int = BLOCK):
    """A new volume ``name`` with ``n`` mapped blocks, no data written, committed.

    Mappings are made with the engine's internal remap call on freshly allocated
    data blocks, so this measures metadata only: the data image stays sparse and
    every block reads as zeros.  Returns the volume's Device.
    """
    dev = pool.create_volume(name, n * block_size)
    for start in range(0, n, POPULATE_STEP):
        pool._remap(dev, [(vb, pool.space.allocate()) for vb in range(start, min(n, start + POPULATE_STEP))])
    pool.commit()
    return dev


def percentile(samples: list[float], pct: float) -> float:
    """The nearest-rank percentile: with fewer than 100 samples, p99 is the largest one."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100), at least 1
    return ordered[int(rank) - 1]


def nonzero_bytes(size: int, seed: int = 1) -> bytes:
    """Random-looking bytes with no zero byte: no block of them is all zeros (zero detection)."""
    return random.Random(seed).randbytes(size).translate(bytes([1]) + bytes(range(1, 256)))


def load_bench():
    """tools/bench as a module, for other tools that reuse its fio runner, workloads and mounts.

    tools/bench is a script (no .py), so it is loaded from its path; its ``main`` does not run.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    if "bench" in sys.modules:
        return sys.modules["bench"]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench")
    loader = importlib.machinery.SourceFileLoader("bench", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bench", loader))
    sys.modules["bench"] = module
    loader.exec_module(module)
    return module
