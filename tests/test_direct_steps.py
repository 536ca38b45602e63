"""Direct mode's reads and writes in steps (plan on the loop, I/O in a thread, apply on the loop).

The mount daemon runs a direct-mode pool's data I/O in worker threads
(fusepool/directio.py), so the pool changes between a request's plan and its
apply.  These tests run the engine's steps by hand, on a real O_DIRECT pool (a
preallocated file), with changes made in between, and check the rules that
make it safe: a data block under I/O is pinned, so freeing it (discard,
remove) and committing does not make it allocatable until the I/O is over; a
write's new blocks are reserved (a commit meanwhile stores them free, so a
crash leaks nothing); a copy-on-write reads the old block in the I/O step.
The bio prison and quiesce are exercised through a real mount in
test_direct_concurrency.py.
"""

import pytest

from fusepool.check import check_pool
from fusepool.engine import Pool
from fusepool.errors import PoolFull
from fusepool.metadata.format import UNMAPPED
from fusepool.metadata.spacemap import DataSpaceMap

MiB = 1 << 20
BS = 64 << 10
NR_BLOCKS = 16


def fill(byte: int, length: int = BS) -> bytes:
    return bytes([byte]) * length


@pytest.fixture
def pool(tmp_path):
    """A small direct-mode pool (O_DIRECT on a preallocated file): 16 data blocks."""
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=NR_BLOCKS * BS, metadata_size=4 * MiB, preallocate=True,
                min_free_space=0)
    pool = Pool.open(path)
    assert pool.data.direct
    yield pool
    if pool.lock is not None:
        pool.close()


def commit_in_steps(pool: Pool) -> None:
    """A commit as the daemon runs it (the I/O step would be in a worker thread)."""
    job = pool.prepare_commit()
    if job is None:
        return
    pool.run_commit(job)
    pool.finish_commit(job)


def crash_and_reopen(pool: Pool) -> Pool:
    path = pool.path
    pool.journal.close()
    pool.data.close()
    pool.store.close()
    pool.lock.release()
    pool.lock = None
    return Pool.open(path)


def fill_pool(pool: Pool, v) -> None:
    """Write every block of ``v`` (as large as the pool): nothing is free."""
    for vb in range(NR_BLOCKS):
        pool.write(v.dev_id, vb * BS, fill(1))
    assert pool.space.free == 0


def _entry_block(pool: Pool, dev_id: int, vb: int) -> int:
    from fusepool.metadata.format import TIME_BITS
    from fusepool.metadata.tree import LeafCursor

    entry = LeafCursor(pool.device(dev_id).root).entry(vb)
    assert entry != UNMAPPED
    return entry >> TIME_BITS


def discard_under_a_write(pool: Pool) -> tuple[bytes, bytes]:
    """An overwrite in place is prepared; meanwhile its block is discarded, a commit
    comes, and another volume wants a block.  Returns (what the other volume wrote,
    what it reads back after the stale write landed)."""
    v = pool.create_volume("v", NR_BLOCKS * BS)
    fill_pool(pool, v)
    block = _entry_block(pool, v.dev_id, 3)
    plan = pool.prepare_write(v.dev_id, 3 * BS + 100, fill(7, 1000))
    assert plan.in_place and plan.io[0][0] == block * BS + 100
    pool.discard(v.dev_id, 3 * BS, BS)  # frees the block under I/O
    commit_in_steps(pool)  # the commit that would make it allocatable
    w = pool.create_volume("w", BS)
    mine = fill(9)
    try:
        pool.write(w.dev_id, 0, mine)
    except PoolFull:
        got_early = None
    else:
        got_early = _entry_block(pool, w.dev_id, 0)
    pool.run_write(plan)  # the stale write lands on the block it planned
    assert pool.finish_write(plan) == 1000
    if got_early is None:  # pinned: only now may it be reused
        pool.write(w.dev_id, 0, mine)
    return mine, pool.read(w.dev_id, 0, BS)


def test_a_block_under_a_write_is_not_reused_after_a_discard_and_commit(pool):
    mine, got = discard_under_a_write(pool)
    assert got == mine, "a stale in-place write landed in another volume's block"
    commit_in_steps(pool)
    assert check_pool(pool.path).ok
    assert not pool.space.pins


def test_without_the_pin_the_stale_write_lands_in_another_volume(pool, monkeypatch):
    """The test above can fail: with pins doing nothing, the other volume is corrupted."""
    monkeypatch.setattr(DataSpaceMap, "pin", lambda self, block: None)
    monkeypatch.setattr(DataSpaceMap, "unpin", lambda self, block: None)
    mine, got = discard_under_a_write(pool)
    assert got != mine and got[100:1100] == fill(7, 1000)


def test_a_block_under_a_read_is_not_reused_after_a_remove_and_commit(pool):
    v = pool.create_volume("v", NR_BLOCKS * BS)
    fill_pool(pool, v)
    pool.write(v.dev_id, 5 * BS, fill(5))
    job = pool.plan_read(v.dev_id, 4 * BS + 10, 2 * BS - 10)
    assert pool.needs_reading(job)
    pool.remove("v")  # frees every block, the two under the read included
    commit_in_steps(pool)
    w = pool.create_volume("w", NR_BLOCKS * BS)
    written = 0
    with pytest.raises(PoolFull):  # all but the two pinned blocks can be taken
        for vb in range(NR_BLOCKS):
            pool.write(w.dev_id, vb * BS, fill(2))
            written += 1
    assert written == NR_BLOCKS - 2
    assert pool.run_read(job) == fill(1, BS - 10) + fill(5, BS)
    pool.finish_read(job)  # the commit that freed them is durable: free now
    pool.write(w.dev_id, written * BS, fill(2, 2 * BS))
    assert pool.read(w.dev_id, 0, NR_BLOCKS * BS) == fill(2, NR_BLOCKS * BS)
    assert check_pool(pool.path).ok


def test_a_commit_between_plan_and_apply_stores_the_new_blocks_free(pool):
    """A write's new block is reserved: a crash after a commit meanwhile leaks nothing."""
    v = pool.create_volume("v", 4 * BS)
    plan = pool.prepare_write(v.dev_id, 0, fill(3, 2 * BS))
    assert len(plan.allocated) == 2 and pool.space.free == NR_BLOCKS - 2
    pool.write(v.dev_id, 3 * BS, fill(4))  # another write meanwhile: other blocks
    assert _entry_block(pool, v.dev_id, 3) not in plan.allocated
    commit_in_steps(pool)
    pool.run_write(plan)
    reopened = crash_and_reopen(pool)  # before finish_write: the write never happened
    try:
        assert check_pool(reopened.path).ok  # no leaked block
        assert reopened.space.free == NR_BLOCKS - 1
        assert reopened.read(reopened.volume("v").dev_id, 0, 4 * BS) == bytes(3 * BS) + fill(4)
    finally:
        reopened.close()


def test_the_write_applies_after_a_commit_meanwhile(pool):
    v = pool.create_volume("v", 4 * BS)
    plan = pool.prepare_write(v.dev_id, BS + 5, fill(3, BS))
    commit_in_steps(pool)
    pool.run_write(plan)
    assert pool.finish_write(plan) == BS
    commit_in_steps(pool)
    assert pool.read(v.dev_id, 0, 4 * BS) == bytes(BS + 5) + fill(3, BS) + bytes(2 * BS - 5)
    assert pool.device(v.dev_id).mapped_blocks == 2
    assert check_pool(pool.path).ok
    assert not pool.space.pins


def test_copy_on_write_reads_the_old_block_in_the_io_step(pool):
    """The shared block is read in run_write (off the loop), pinned until then; the
    snapshot it is shared with may go meanwhile."""
    v = pool.create_volume("v", 2 * BS)
    pool.write(v.dev_id, 0, fill(1))
    pool.snapshot("v", "s")
    old = _entry_block(pool, v.dev_id, 0)
    plan = pool.prepare_write(v.dev_id, 100, fill(2, 50))
    assert len(plan.copies) == 1 and plan.pinned == [old]
    pool.remove("s")  # the old block's last other reference
    commit_in_steps(pool)
    pool.run_write(plan)
    assert pool.finish_write(plan) == 50
    assert pool.read(v.dev_id, 0, BS) == fill(1, 100) + fill(2, 50) + fill(1, BS - 150)
    assert _entry_block(pool, v.dev_id, 0) != old
    commit_in_steps(pool)
    assert check_pool(pool.path).ok
    assert pool.space.free == NR_BLOCKS - 1  # the old block is free again


def test_a_copy_that_becomes_zeros_unmaps(pool):
    """Zero detection: zeros written over a shared block's only data unmap it; the
    block reserved for the copy goes back."""
    pool.config.zero_detection = True
    v = pool.create_volume("v", 2 * BS)
    pool.write(v.dev_id, 0, fill(1, 10))
    pool.snapshot("v", "s")
    plan = pool.prepare_write(v.dev_id, 0, bytes(10))
    assert len(plan.copies) == 1 and len(plan.allocated) == 1
    pool.run_write(plan)
    pool.finish_write(plan)
    assert pool.device(v.dev_id).mapped_blocks == 0
    assert pool.space.free == NR_BLOCKS - 1
    assert pool.read(pool.volume("s").dev_id, 0, 10) == fill(1, 10)
    commit_in_steps(pool)
    assert check_pool(pool.path).ok


def test_an_abandoned_write_gives_everything_back(pool):
    v = pool.create_volume("v", 4 * BS)
    pool.write(v.dev_id, 0, fill(1))
    pool.snapshot("v", "s")
    plan = pool.prepare_write(v.dev_id, 10, fill(2, 2 * BS - 10))  # a copy and a new block
    assert plan.pinned and len(plan.allocated) == 2
    pool.abandon_write(plan)
    assert not pool.space.pins and pool.space.free == NR_BLOCKS - 1
    assert pool.read(v.dev_id, 0, 2 * BS) == fill(1) + bytes(BS)
    commit_in_steps(pool)
    assert check_pool(pool.path).ok


def test_a_read_error_in_the_io_step_fails_the_write_only(pool, monkeypatch):
    """The copy's read fails in run_write: EIO for this write, nothing changed, pool writable."""
    from fusepool.datastore import DataReadError

    v = pool.create_volume("v", 2 * BS)
    pool.write(v.dev_id, 0, fill(1))
    pool.snapshot("v", "s")
    plan = pool.prepare_write(v.dev_id, 10, fill(2, 10))

    def failing_read(block, offset, length):
        raise DataReadError("reading the data failed: Input/output error")

    monkeypatch.setattr(pool.data, "read", failing_read)
    pool.run_write(plan)
    monkeypatch.undo()
    with pytest.raises(DataReadError):
        pool.finish_write(plan)
    assert pool.failed is None and not pool.space.pins and pool.space.free == NR_BLOCKS - 1
    assert pool.read(v.dev_id, 0, BS) == fill(1)
    commit_in_steps(pool)
    assert check_pool(pool.path).ok


def test_a_write_past_the_end_zeroes_the_tail_first(pool):
    v = pool.create_volume("v", BS + 100)
    pool.write(v.dev_id, BS, fill(1, 100))
    # Bytes past the end, in the last block: a crash may have taken back their size.
    pool.write(v.dev_id, BS + 100, fill(6, 50))
    pool.device(v.dev_id).size = BS + 100
    tail = pool.tail_zeros(v.dev_id, 2 * BS + 10)
    assert tail == (BS + 100, BS - 100)
    plan = pool.prepare_write(v.dev_id, tail[0], bytes(tail[1]), grow=False)
    pool.run_write(plan)
    pool.finish_write(plan)
    assert pool.device(v.dev_id).size == BS + 100
    plan = pool.prepare_write(v.dev_id, 2 * BS + 10, fill(2, 10))
    pool.run_write(plan)
    assert pool.finish_write(plan) == 10
    assert pool.read(v.dev_id, BS, BS + 20) == fill(1, 100) + bytes(BS - 100 + 10) + fill(2, 10)
