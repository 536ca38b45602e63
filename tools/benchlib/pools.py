"""Pools made in this process with mappings but no data: the engine and reporting benchmarks' inputs.

Mappings are made with the engine's internal remap call on freshly allocated data blocks, so what
is measured is metadata only: the data image stays sparse and every block reads as zeros.
"""

import random
import time

BLOCK = ENGINE_BLOCK = 64 << 10  # the `fusepool init` default block size
DEFAULT_DATA_SIZE = 100 << 30  # the `fusepool init` defaults
DEFAULT_METADATA_SIZE = 2 << 30
FILL_FACTOR = 0.85  # mapped + later allocations stay under this share of the data blocks
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


def nonzero_bytes(size: int, seed: int = 1) -> bytes:
    """Random-looking bytes with no zero byte: no block of them is all zeros (zero detection)."""
    return random.Random(seed).randbytes(size).translate(bytes([1]) + bytes(range(1, 256)))


def engine_pool(path: str, n: int, allocations: int) -> dict:
    """A pool (init defaults, grown if needed) with volume 'origin' of ``n`` mapped blocks."""
    from fusepool.engine import Pool

    need_blocks = int((n + allocations) / FILL_FACTOR) + 1
    data_size = max(DEFAULT_DATA_SIZE, need_blocks * ENGINE_BLOCK)
    Pool.create(path, data_size=data_size, metadata_size=DEFAULT_METADATA_SIZE, block_size=ENGINE_BLOCK)
    start = time.perf_counter()
    with Pool.open(path) as pool:
        dev = populate(pool, "origin", n, ENGINE_BLOCK)
        if dev.mapped_blocks != n:
            raise RuntimeError(f"volume has {dev.mapped_blocks} mapped blocks, expected {n}")
    return {"data_size": data_size, "metadata_size": DEFAULT_METADATA_SIZE, "block_size": ENGINE_BLOCK,
            "populate_s": time.perf_counter() - start}


def docker_chain_pool(path: str, blocks: int, layers: int) -> dict:
    """A base volume of ``blocks`` mapped blocks (mappings only) and a chain of ``layers``
    snapshots, each of the one before with a 1-byte copy-on-write write (a Docker image's layers)."""
    from fusepool.engine import Pool

    data_size = max(DEFAULT_DATA_SIZE, int((blocks + layers) / FILL_FACTOR + 1) * ENGINE_BLOCK)
    Pool.create(path, data_size=data_size, metadata_size=DEFAULT_METADATA_SIZE, block_size=ENGINE_BLOCK)
    rnd, start = random.Random(11), time.perf_counter()
    with Pool.open(path) as pool:
        parent = populate(pool, "base", blocks, ENGINE_BLOCK).name
        for i in range(layers):
            dev = pool.snapshot(parent, f"layer{i}")
            pool.write(dev.dev_id, rnd.randrange(blocks) * ENGINE_BLOCK + rnd.randrange(ENGINE_BLOCK), b"x")
            parent = dev.name
        pool.commit()
    return {"blocks": blocks, "layers": layers, "data_size": data_size,
            "build_s": time.perf_counter() - start}
