"""The sync journal: an fsync appends a record instead of a full commit; a crash replays it.

A "crash" here abandons an open Pool without committing (its files hold exactly
what was made durable, since every durable step ends in an fdatasync), and
the pool is opened again.  The mount test kills a real daemon after an fsync.
"""

import os
import random
from array import array

import pytest
from conftest import read_all, run_fusepool

from fusepool.check import check_pool, repair
from fusepool.config import JOURNAL
from fusepool.engine import Pool
from fusepool.errors import Corrupt
from fusepool.metadata import journal as journal_format
from fusepool.metadata.format import MAX_VOLUME_SIZE, TIME_BITS, UNMAPPED

BS = 64 << 10


def new_pool(tmp_path) -> str:
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=64 << 20, metadata_size=8 << 20, block_size=BS, min_free_space=0)
    return path


def crash(pool: Pool) -> None:
    """Drop an open pool on the floor: nothing more reaches its files."""
    pool.journal.close()
    pool.data.close()
    pool.store.close()
    pool.lock.release()


def contents(pool: Pool) -> dict[str, bytes]:
    return {d.name: pool.read(d.dev_id, 0, d.size) for d in pool.volumes()}


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_sync_writes_a_record_and_a_crash_replays_it(tmp_path):
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 16 * BS)
    pool.write(v.dev_id, 0, pattern(1, 8 * BS))
    pool.commit()
    pool.snapshot("v", "s")
    txn = pool.transaction_id
    commits = pool.commits
    # every kind of data-path change: CoW break (partial and whole), a new block, a
    # whole block of zeros (unmaps), a discard, an in-place overwrite, a write past the end
    pool.write(v.dev_id, 100, b"partial")
    pool.write(v.dev_id, 2 * BS, pattern(2, BS))
    pool.write(v.dev_id, 10 * BS, pattern(3, BS + 5))
    pool.write(v.dev_id, 3 * BS, bytes(BS))
    pool.discard(v.dev_id, 4 * BS, 2 * BS)
    pool.write(v.dev_id, 10 * BS + 7, b"in place")
    pool.write(v.dev_id, 16 * BS + 3, b"grown")
    pool.sync()
    assert pool.commits == commits and pool.journal_syncs == 1, "sync took a full commit"
    assert pool.transaction_id == txn
    want = contents(pool)
    want_used = pool.space.used
    pool.write(v.dev_id, 12 * BS, pattern(4, BS))  # after the sync: lost in the crash
    crash(pool)

    report = check_pool(path)
    assert report.ok, report.problems
    assert any("journal: 1 record(s)" in note for note in report.notes), report.notes
    with Pool.open(path) as pool:
        assert contents(pool) == want
        assert pool.volume("v").size == 16 * BS + 8
        assert pool.space.used == want_used
        assert pool.transaction_id == txn + 1  # the replay is committed at once
    report = check_pool(path)
    assert report.ok and not any("journal" in n for n in report.notes), (report.problems, report.notes)


def test_records_replay_in_order_and_a_torn_one_is_ignored(tmp_path):
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 32 * BS)
    rng = random.Random(7)
    states = []
    for step in range(6):
        if step == 3:
            pool.snapshot("v", "s")  # a full commit between records: the journal starts over
        for _ in range(10):
            block = rng.randrange(32)
            if rng.random() < 0.3:
                pool.discard(v.dev_id, block * BS, BS)
            else:
                pool.write(v.dev_id, block * BS, pattern(rng.randrange(1 << 30), BS))
        pool.sync()
        states.append((contents(pool), pool.journal.end))
    records = pool.journal_syncs
    crash(pool)
    assert records == 6

    with open(os.path.join(path, JOURNAL), "r+b") as f:  # tear the last record
        f.truncate(states[-1][1] - 3)
    with Pool.open(path) as pool:
        got = contents(pool)
    # Each block reads as the last complete record left it, or as the torn one would
    # have: overwrites in place reach the data file before the record is written.
    before, after = states[-2][0], states[-1][0]
    for name in after:
        for block in range(len(after[name]) // BS):
            piece = got[name][block * BS : (block + 1) * BS]
            assert piece in (before[name][block * BS : (block + 1) * BS],
                             after[name][block * BS : (block + 1) * BS]), (name, block)
    assert got != after, "the torn record was replayed"
    assert check_pool(path).ok


def test_records_of_an_older_commit_are_not_replayed(tmp_path):
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 4 * BS)
    pool.write(v.dev_id, 0, pattern(1, BS))
    pool.sync()  # a record that maps block 0 (on top of the create's commit)
    pool.discard(v.dev_id, 0, BS)
    pool.commit()  # the record is now history; its bytes stay in the file
    assert os.path.getsize(os.path.join(path, JOURNAL)) > 0
    crash(pool)
    with Pool.open(path) as pool:
        assert pool.read(pool.volume("v").dev_id, 0, BS) == bytes(BS)
        assert pool.volume("v").mapped_blocks == 0


def test_a_journal_that_does_not_apply_is_refused_and_repair_drops_it(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        pool.write(v.dev_id, 0, pattern(1, BS))
        pool.commit()
        sb = pool.store.superblock
        uuid = pool._uuid_bytes
    # well formed and checksummed, but it names a device that does not exist
    record = journal_format.encode(uuid, sb.transaction_id, 0, sb.time, [(99, BS, 0)],
                                   array("Q", [99, 0, UNMAPPED]))
    with open(os.path.join(path, JOURNAL), "wb") as f:
        f.write(record)
    with pytest.raises(Corrupt, match="journal"):
        Pool.open(path)
    report = check_pool(path)
    assert [p.kind for p in report.problems] == ["journal", "journal"], report.problems
    result = run_fusepool("check", path, check=False)
    assert result.returncode != 0 and "journal" in result.stdout + result.stderr
    said = repair(path)
    assert any("dropped 1 journal record" in line for line in said), said
    assert check_pool(path).ok
    with Pool.open(path) as pool:
        assert pool.read(pool.volume("v").dev_id, 0, BS) == pattern(1, BS)


def test_structure_changes_and_long_journals_take_a_full_commit(tmp_path, monkeypatch):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 64 * BS)
        pool.write(v.dev_id, 0, pattern(1, BS))
        pool.rename("v", "w")
        commits = pool.commits
        pool.write(v.dev_id, BS, pattern(2, BS))
        pool.sync()
        assert (pool.commits, pool.journal_syncs) == (commits, 1)
        monkeypatch.setattr("fusepool.engine.txn.JOURNAL_MAX_MAPPINGS", 3)
        pool.write(v.dev_id, 8 * BS, pattern(3, 4 * BS))  # 4 mappings: over the limit
        pool.sync()
        assert (pool.commits, pool.journal_syncs) == (commits + 1, 1)


def test_fsync_through_the_mount_survives_a_daemon_kill(pool, make_mount):
    m = make_mount(pool, "--commit-period", "3600")  # only the fsync makes anything durable
    run_fusepool("create", pool, "v", "--size", "4M")
    data = pattern(5, 1 << 20)
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.kill()
    log = (pool / "fusepool.log").read_text()
    assert "journal" not in log  # nothing replayed yet
    m.mount()
    assert read_all(m.vol("v"), 1 << 20, 1 << 20) == data
    assert "replayed 1 journal record(s)" in (pool / "fusepool.log").read_text()


def test_a_commit_between_a_flushs_prepare_and_its_io_supersedes_the_record(tmp_path):
    """The FUSE adapter prepares a FLUSH on the event loop and runs its I/O in a worker
    thread; a namespace command may commit in between (it resets the journal).  The
    late record must not be appended: stamped with the old transaction it would sit
    first in the journal and hide every later record from the replay (fsync-ed data
    lost), and stamped anew it would take back mappings changed since."""
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 16 * BS)
    pool.write(v.dev_id, 0, pattern(1, BS))
    job = pool.prepare_sync()  # the FLUSH, taken on the loop ...
    pool.create_volume("other", BS)  # ... a commit runs before its thread does
    pool.run_sync(job)
    pool.finish_sync(job)
    assert job.superseded and pool.journal.end == 0
    pool.write(v.dev_id, 2 * BS, pattern(2, BS))  # a later write and FLUSH: a real record
    pool.sync()
    want = contents(pool)
    crash(pool)
    with Pool.open(path) as pool:
        assert contents(pool) == want


# --- one rule for replay, check and repair: validate_record --------------------------------

NR_BLOCKS = (64 << 20) // BS  # new_pool's data blocks
VOLUME = 4 * BS


def record_of(devices, mappings, seq=0, time=0):
    return journal_format.Record(seq, time, devices, array("Q", mappings))


# (devices, mappings, time) of a record against a pool whose volume 1 has VOLUME bytes, and
# what validate_record says about it.
BAD_RECORDS = {
    "pool time": ([], [], 1, "has pool time 1, the commit's is 0"),
    "no such device": ([(99, BS, 0)], [], 0, "names device 99, which does not exist"),
    "grown too far": ([(1, MAX_VOLUME_SIZE + 1, 0)], [], 0, "grows device 1 to"),
    "block past the end": ([], [1, 4, UNMAPPED], 0, "maps block 4 of device 1, outside every volume"),
    "mapping of no device": ([], [99, 0, UNMAPPED], 0, "maps block 0 of device 99, outside every"),
    "data block past the pool": ([], [1, 0, NR_BLOCKS << TIME_BITS], 0, "to an invalid entry"),
    "mapped after the pool time": ([], [1, 0, 1], 0, "to an invalid entry 0x1"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_validate_record_names_each_kind_of_bad_record(kind):
    devices, mappings, time, reason = BAD_RECORDS[kind]
    problems = journal_format.validate_record(record_of(devices, mappings, time=time), {1: VOLUME},
                                              BS, NR_BLOCKS, 0)
    assert len(problems) == 1 and reason in problems[0], problems


def test_validate_record_follows_sizes_from_record_to_record():
    """A record that grows a device makes its new blocks valid for itself and the records after it."""
    sizes = {1: VOLUME}
    grow = record_of([(1, 2 * VOLUME, 0)], [1, 5, UNMAPPED])
    assert journal_format.validate_record(grow, sizes, BS, NR_BLOCKS, 0) == []
    assert sizes == {1: 2 * VOLUME}
    later = record_of([], [1, 7, 3 << TIME_BITS], seq=1)
    assert journal_format.validate_record(later, sizes, BS, NR_BLOCKS, 0) == []
    # every reason of a record is named, not only the first
    worse = record_of([(98, 0, 0)], [1, 8 * 4, UNMAPPED, 1, 0, 1], seq=2, time=5)
    assert len(journal_format.validate_record(worse, sizes, BS, NR_BLOCKS, 0)) == 4


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_replay_check_and_repair_refuse_a_bad_record_for_the_same_reason(tmp_path, kind):
    """The engine refuses to open, check reports it, repair drops it: one rule, one reason."""
    devices, mappings, time, reason = BAD_RECORDS[kind]
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", VOLUME)
        assert v.dev_id == 1
        pool.write(v.dev_id, 0, pattern(1, BS))
        pool.commit()
        sb = pool.store.superblock
        uuid = pool._uuid_bytes
    assert sb.time == 0
    record = journal_format.encode(uuid, sb.transaction_id, 0, time, devices, array("Q", mappings))
    with open(os.path.join(path, JOURNAL), "wb") as f:
        f.write(record)
    with pytest.raises(Corrupt, match="journal") as refused:
        Pool.open(path)
    assert reason in str(refused.value)
    assert any(p.kind == "journal" and reason in p.message for p in check_pool(path).problems)
    said = repair(path)
    assert any("dropped 1 journal record" in line and reason in line for line in said), said
    assert check_pool(path).ok
    with Pool.open(path) as pool:
        assert pool.read(pool.volume("v").dev_id, 0, BS) == pattern(1, BS)
