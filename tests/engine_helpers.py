"""Helpers for the tests that drive fusepool.engine.Pool in-process: small pools and fingerprints.

Used by the engine layer (tests/test_engine_*.py), the FUSE-handler layer
(tests/test_fs_handlers.py) and the in-process fault tests (test_io_errors.py,
test_zero_writes.py); the model and the invariant checker are in engine_model.py,
the fault layer in faultfs.py, the fixtures for mounts in conftest.py.
"""

import contextlib
import os
import random

from faultfs import FaultFS

from fusepool.engine import Pool
from fusepool.metadata.store import read_superblocks

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = 64 * KiB


def new_pool(tmp_path, name: str = "pool", **kw) -> str:
    """Create a small pool (64 MiB data, 8 MiB metadata, 64 KiB blocks, no min free space)."""
    args = {"data_size": 64 * MiB, "metadata_size": 8 * MiB, "block_size": BS, "min_free_space": 0}
    args.update(kw)
    path = str(tmp_path / name)
    Pool.create(path, **args)
    return path


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def mapping_of(pool, dev) -> dict[int, int]:
    """virtual block -> data block."""
    return {vb: block for vb, block, _ in pool.mappings(dev)}


def pool_state(pool) -> dict:
    """A fingerprint of everything observable, to check that a refused request changed nothing."""
    return {
        "names": sorted(pool.names),
        "devices": {d.name: (d.dev_id, d.size, d.mapped_blocks, sorted(mapping_of(pool, d).items()))
                    for d in pool.volumes()},
        # Mapped blocks only (unmapped ones read as zeros by construction; volumes may be huge).
        "contents": {d.name: {vb: pool.read(d.dev_id, vb * pool.block_size, pool.block_size)
                              for vb in mapping_of(pool, d)} for d in pool.volumes()},
        "txn": pool.transaction_id,
        "used": pool.space.used,
        "free": pool.space.free,
        "time": pool.time,
        "dirty": pool.dirty,
        "failed": pool.failed,
    }


def expect_logged(caplog, text: str) -> None:
    """Assert that ``text`` was logged, and mark it expected (see conftest)."""
    found = [r for r in caplog.get_records("call") if text in r.getMessage()]
    assert found, f"expected a log record containing {text!r}"
    for record in found:
        record.expected = True


def read_superblocks_of(path: str):
    fd = os.open(os.path.join(path, "metadata"), os.O_RDONLY)
    try:
        return read_superblocks(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def tracked_pool(tmp_path, files=("data", "metadata", "journal"), **pool_args):
    """A new pool (``new_pool``) whose ``files`` go through the fault layer: yields (fs, path).

    The pool is tracked before anything opens it, as FaultFS requires.
    """
    path = new_pool(tmp_path, **pool_args)
    with FaultFS(files) as fs:
        fs.track(path)
        yield fs, path
