"""A commit in three steps (prepare on the loop, I/O in a worker thread, finish on the loop).

The mount daemon lets requests change the pool while a commit's fdatasyncs
and metadata writes run in a worker thread.  These tests make those changes
happen between the steps, as they do in the daemon, and check the rules that
make it safe: the commit holds exactly what was there at prepare; blocks freed
after it are not reused before the next commit; a commit asked for on the
loop meanwhile finishes the one in flight first; and what is durable after a
crash at any point is a state the pool really was in.
"""

import errno
import random

import pytest
from faultfs import POLICIES, FaultFS, write_image

from fusepool.check import check_pool
from fusepool.engine import Pool
from fusepool.errors import PoolError

MiB = 1 << 20
BS = 64 << 10
FILES = ("data", "metadata", "journal")


def fill(byte: int, length: int = BS) -> bytes:
    return bytes([byte]) * length


@pytest.fixture
def pool(tmp_path):
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=16 * MiB, metadata_size=4 * MiB)
    pool = Pool.open(path)
    yield pool
    if pool.lock is not None:
        pool.close()


def crash_and_reopen(pool: Pool) -> Pool:
    """Drop the pool as a SIGKILL would (nothing more written), then open it again."""
    path = pool.path
    pool.journal.close()
    pool.data.close()
    pool.store.close()
    pool.lock.release()
    pool.lock = None
    return Pool.open(path)


def test_the_commit_holds_what_was_there_at_prepare(pool):
    v = pool.create_volume("v", 8 * BS)
    pool.write(v.dev_id, 0, fill(1, 4 * BS))
    job = pool.prepare_commit()
    # Meanwhile on the loop: new blocks, an overwrite that copies, a discard.
    pool.write(v.dev_id, 4 * BS, fill(2))
    pool.discard(v.dev_id, 0, BS)
    assert pool.dirty  # those belong to the next commit
    pool.run_commit(job)
    pool.finish_commit(job)
    assert pool.dirty
    reopened = crash_and_reopen(pool)
    try:
        data = reopened.read(reopened.volume("v").dev_id, 0, 5 * BS)
        assert data == fill(1, 4 * BS) + bytes(BS)  # as at prepare: block 0 still mapped
        assert check_pool(reopened.path).ok
    finally:
        reopened.close()


def test_blocks_freed_during_the_io_wait_for_the_next_commit(pool):
    v = pool.create_volume("v", 8 * BS)
    pool.write(v.dev_id, 0, fill(1, 2 * BS))
    pool.commit()
    block = pool.extents(v)[0]["data_block"]
    pool.write(v.dev_id, 2 * BS, fill(3))
    job = pool.prepare_commit()
    pool.discard(v.dev_id, 0, BS)  # frees `block` in the *next* transaction
    pool.run_commit(job)
    pool.finish_commit(job)
    # The durable commit still maps `block` to v: it must not be handed out yet.
    assert pool.space.busy[block] == 1
    w = pool.create_volume("w", 8 * BS)  # (a commit: now the discard is durable)
    pool.write(w.dev_id, 0, fill(4, 8 * BS))
    assert pool.space.counts[block] <= 1


def test_a_commit_on_the_loop_finishes_the_one_in_flight_first(pool):
    v = pool.create_volume("v", 8 * BS)
    pool.write(v.dev_id, 0, fill(5, 2 * BS))
    job = pool.prepare_commit()  # its I/O not started (the worker thread is late)
    pool.write(v.dev_id, 2 * BS, fill(6))
    pool.snapshot("v", "s")  # commits on the loop: the job in flight goes first
    assert pool.commit_in_flight is None and job.finished
    pool.run_commit(job)  # the worker thread comes late: nothing left to do
    assert pool.finish_commit(job) == job.write.superblock.transaction_id
    reopened = crash_and_reopen(pool)
    try:
        s = reopened.volume("s")
        assert reopened.read(s.dev_id, 0, 3 * BS) == fill(5, 2 * BS) + fill(6)
        assert check_pool(reopened.path).ok
    finally:
        reopened.close()


def test_a_crash_between_io_and_finish_leaves_the_commit_durable(pool):
    v = pool.create_volume("v", 8 * BS)
    pool.write(v.dev_id, 0, fill(7, 3 * BS))
    job = pool.prepare_commit()
    pool.write(v.dev_id, 3 * BS, fill(8))  # never committed: lost in the crash
    pool.run_commit(job)
    reopened = crash_and_reopen(pool)  # before finish_commit
    try:
        data = reopened.read(reopened.volume("v").dev_id, 0, 4 * BS)
        assert data == fill(7, 3 * BS) + bytes(BS)
        assert check_pool(reopened.path).ok
    finally:
        reopened.close()


def test_a_failed_commit_io_fails_the_pool_and_keeps_the_last_commit(tmp_path, caplog):
    caplog.set_level("CRITICAL", logger="fusepool")  # (the pool logs its failure: expected)
    path = str(tmp_path / "faulty")
    Pool.create(path, data_size=16 * MiB, metadata_size=4 * MiB)
    with FaultFS(FILES) as fs:
        fs.track(path)
        pool = Pool.open(path)
        v = pool.create_volume("v", 8 * BS)
        pool.write(v.dev_id, 0, fill(9))
        pool.commit()
        txn = pool.transaction_id
        pool.write(v.dev_id, BS, fill(10))
        job = pool.prepare_commit()
        pool.write(v.dev_id, 2 * BS, fill(11))  # (changed meanwhile: cannot be undone)
        fs.fail_next_sync("metadata", errno.EIO)
        pool.run_commit(job)
        with pytest.raises(PoolError, match="writing the metadata failed"):
            pool.finish_commit(job)
        assert pool.needs_check
        pool.close()
    with Pool.open(path) as reopened:
        assert reopened.needs_check
        assert reopened.transaction_id == txn  # the failed commit's pages were never durable


def test_power_cut_at_any_point_of_a_commit_in_steps(tmp_path):
    """At every file operation of a commit whose I/O interleaves with new writes, a crash
    image opens clean, at the commit before or the one being written, with its content."""
    path = str(tmp_path / "cut")
    Pool.create(path, data_size=16 * MiB, metadata_size=4 * MiB)
    rng = random.Random(11)
    images = []
    with FaultFS(FILES) as fs:
        fs.track(path)
        pool = Pool.open(path)
        v = pool.create_volume("v", 8 * BS)
        pool.write(v.dev_id, 0, fill(1, 2 * BS))
        pool.commit()
        before = (pool.transaction_id, fill(1, 2 * BS) + bytes(2 * BS))
        pool.write(v.dev_id, 2 * BS, fill(2))
        job = pool.prepare_commit()
        at_prepare = (job.write.superblock.transaction_id, fill(1, 2 * BS) + fill(2) + bytes(BS))
        pool.write(v.dev_id, 3 * BS, fill(3))  # the next commit's
        pool.discard(v.dev_id, 0, BS)  # the next commit's
        fs.on_event = lambda event: images.extend(fs.crash_image(rng, policy) for policy in POLICIES)
        pool.run_commit(job)
        fs.on_event = None
        pool.finish_commit(job)
        pool.close()
    expected = dict([before, at_prepare])
    assert len(images) >= 4 * len(POLICIES)
    seen = set()
    for n, image in enumerate(images):
        directory = write_image(image, path, str(tmp_path / f"img{n}"))
        report = check_pool(directory)
        assert report.ok, (n, [p.message for p in report.problems])
        assert report.transaction in expected, (n, report.transaction)
        seen.add(report.transaction)
        with Pool.open(directory) as reopened:
            assert reopened.read(reopened.volume("v").dev_id, 0, 4 * BS) == expected[report.transaction]
    assert seen == set(expected)  # cuts before and after the superblock's flush were both met
