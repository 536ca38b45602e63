"""Bulk reporting on a held commit (dm-thin's reserve_metadata_snap), not in the daemon.

The engine layer: a held commit's pages survive any number of later commits,
so a reader sees exactly that commit; released, the pages are reused (and a
reader that came too late gets an error, never a mix).  The mounted layer: the
CLI's `list`/`map`/`dump`/`check` of a mounted pool read the held commit while
the pool goes on changing, and a client that dies releases its hold.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from fusepool import control
from fusepool.check import check_pool
from fusepool.engine import Pool, walks
from fusepool.engine.view import CommittedView
from fusepool.errors import Corrupt
from fusepool.metadata.format import Superblock
from tests.conftest import fusepool_json, run_fusepool, write_fully

MiB = 1 << 20
BS = 64 << 10


def churn(pool: Pool, rounds: int, dev_id: int) -> None:
    """Rewrite every block of a snapshot-shared volume, a commit each round: metadata
    pages are freed and reused at every commit."""
    for i in range(rounds):
        name = f"churn{i}"
        pool.snapshot(pool.device(dev_id).name, name)  # shares the tree: the writes shadow it
        for block in range(0, 32):
            pool.write(dev_id, block * BS, bytes([i + 1]) * 512)
        pool.commit()
        pool.remove(name)
        pool.commit()


def report(view) -> list[dict]:
    return walks.describe_all(view, view.volumes())


@pytest.fixture
def engine_pool(tmp_path):
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=64 * MiB, metadata_size=8 * MiB)
    pool = Pool.open(path)
    dev = pool.create_volume("v", 8 * MiB)
    for block in range(0, 64, 2):
        pool.write(dev.dev_id, block * BS, b"x" * BS)
    pool.snapshot("v", "s")
    yield pool, dev.dev_id
    pool.close()


def test_a_held_commit_reads_back_exactly_after_many_commits(engine_pool):
    pool, dev_id = engine_pool
    superblock = pool.reserve_metadata_snap()
    txn = pool.transaction_id
    expected = report(pool)
    expected_map = walks.extents(pool, pool.device(dev_id))
    churn(pool, 20, dev_id)
    assert pool.transaction_id > txn + 2  # the held commit's superblock slot was rewritten

    view = CommittedView.load(pool.path, txn, superblock)
    assert report(view) == expected
    assert walks.extents(view, view.devices[dev_id]) == expected_map
    result = check_pool(pool.path, superblock=Superblock.unpack(superblock, txn % 2))
    assert result.ok, result.problems
    assert result.transaction == txn
    pool.release_metadata_snap()


def test_released_pages_are_reused_and_a_late_reader_gets_an_error(engine_pool):
    pool, dev_id = engine_pool
    free_before = pool.store.free_pages
    superblock = pool.reserve_metadata_snap()
    txn = pool.transaction_id
    held_free = pool.store.free_pages
    assert held_free <= free_before
    churn(pool, 3, dev_id)
    pool.release_metadata_snap()
    assert pool.store.holds == 0
    # Without the hold the same churn overwrites the old commit's pages: reading it
    # now fails (a page from a later transaction, or a bad checksum), never a mix.
    churn(pool, 20, dev_id)
    with pytest.raises(Corrupt):
        CommittedView.load(pool.path, txn, superblock)
    # and nothing stays held: free pages come back to what the live state leaves
    assert not any(state & 8 for state in pool.store.page_state)


def test_two_overlapping_holds_keep_both_commits(engine_pool):
    pool, dev_id = engine_pool
    first = pool.reserve_metadata_snap()
    first_txn = pool.transaction_id
    first_report = report(pool)
    churn(pool, 2, dev_id)
    second = pool.reserve_metadata_snap()
    second_txn = pool.transaction_id
    second_report = report(pool)
    churn(pool, 2, dev_id)
    pool.release_metadata_snap()  # one of the two: both commits must still read
    churn(pool, 10, dev_id)
    assert report(CommittedView.load(pool.path, first_txn, first)) == first_report
    assert report(CommittedView.load(pool.path, second_txn, second)) == second_report
    pool.release_metadata_snap()


# --- mounted: the CLI walks the held commit ---------------------------------------------------

def test_online_reports_come_from_the_held_commit_while_the_pool_changes(pool, make_mount):
    mount = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "8M")
    write_fully(mount.vol("v"), 0, os.urandom(4 * MiB))
    run_fusepool("snapshot", pool, "v", "s")
    before = fusepool_json("list", pool)
    with control.held(str(pool), "reserve_metadata_snap") as snap:
        txn = snap["transaction"]
        # The pool goes on: writes, snapshots (commits), removals.
        for i in range(6):
            write_fully(mount.vol("v"), i * BS, os.urandom(BS))
            run_fusepool("snapshot", pool, "v", f"t{i}")
            run_fusepool("remove", pool, f"t{i}")
        view = CommittedView.load(str(pool), txn, bytes.fromhex(snap["superblock"]))
        assert walks.describe_all(view, view.volumes()) == before
    after = fusepool_json("list", pool)
    assert after != before  # (v's blocks were rewritten: now exclusive)
    check = fusepool_json("check", pool)
    assert check["ok"], check


def test_a_client_that_dies_holding_a_commit_releases_it(pool, make_mount):
    mount = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "8M")
    write_fully(mount.vol("v"), 0, os.urandom(2 * MiB))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom fusepool import control\n"
         f"with control.held({str(pool)!r}, 'reserve_metadata_snap') as snap:\n"
         "    print(snap['transaction'], flush=True)\n    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip().isdigit()
        used_held = fusepool_json("info", pool)["metadata_space_used"]
        # Churn: with the hold, the old commit's pages stay in use on top of the new ones.
        for i in range(4):
            write_fully(mount.vol("v"), i * BS, os.urandom(BS))
            run_fusepool("snapshot", pool, "v", f"t{i}")
            run_fusepool("remove", pool, f"t{i}")
        used_churned = fusepool_json("info", pool)["metadata_space_used"]
        assert used_churned > used_held
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # The daemon notices the closed connection and releases the pages (at the next commits).
    deadline = time.monotonic() + 10
    while True:
        run_fusepool("snapshot", pool, "v", "tick")
        run_fusepool("remove", pool, "tick")
        used = fusepool_json("info", pool)["metadata_space_used"]
        if used < used_churned or time.monotonic() > deadline:
            break
    assert used < used_churned
