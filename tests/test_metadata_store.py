"""MetadataStore.write_new: the one way a metadata file is made (create, repair, restore).

Its contract: the file holds one commit of the state and trees given, with
the reference counts and each device's mapped-block count derived from the
trees (whatever the caller's records say); it passes ``check`` and opens;
it never overwrites a file, and leaves none behind when it fails.
"""

import os
from array import array

import pytest

from fusepool.check import check_pool
from fusepool.config import METADATA
from fusepool.engine import Pool
from fusepool.errors import MetadataFull
from fusepool.metadata.format import FANOUT, PAGE_SIZE
from fusepool.metadata.store import MetadataStore
from fusepool.metadata.tree import Node, pack

BS = 64 << 10
NR_BLOCKS = 1024
META_PAGES = (8 << 20) // PAGE_SIZE


def record(dev_id: int, name: str, blocks: int, **fields) -> dict:
    return {"dev_id": dev_id, "name": name, "size": blocks * BS, "creation_time": 0, "snap_time": 1,
            "transaction": 0, "created": 0.0, "origin": None, "mtime": 0.0, "deleted": False,
            **fields}


def leaf(mappings: dict[int, tuple[int, int]]) -> Node:
    node = Node(0)
    for slot, (block, time) in mappings.items():
        node.entries[slot] = pack(block, time)
    return node


def empty_pool(tmp_path) -> tuple[str, str]:
    """A pool directory whose metadata file is gone: (pool dir, its uuid)."""
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=NR_BLOCKS * BS, metadata_size=META_PAGES * PAGE_SIZE, block_size=BS,
                min_free_space=0)
    with Pool.open(path) as pool:
        uuid = pool.store.superblock.uuid
    os.unlink(os.path.join(path, METADATA))
    return path, uuid


def write(path: str, uuid: str, state: dict, roots: dict, **kw) -> None:
    MetadataStore.write_new(os.path.join(path, METADATA), uuid=uuid, transaction_id=kw.pop("txn", 5),
                            time=1, block_size=BS, nr_data_blocks=NR_BLOCKS, nr_meta_pages=META_PAGES,
                            state=state, roots=roots, **kw)


def test_write_new_derives_the_counts_from_the_trees_and_passes_check(tmp_path):
    """A snapshot pair sharing a two-level tree: the shared leaf counts once per block, each
    device's mapped_blocks comes from its tree (the records' 999 is ignored), and the pool
    checks clean and opens at the transaction asked for."""
    path, uuid = empty_pool(tmp_path)
    shared = leaf({0: (10, 0), 1: (11, 0)})
    origin = Node(1, [shared] + [None] * (FANOUT - 1))
    snap = Node(1, [shared, leaf({3: (12, 1)})] + [None] * (FANOUT - 2))
    shared.share = 2
    blocks = 2 * FANOUT
    state = {"next_dev_id": 3, "devices": [record(1, "origin", blocks, mapped_blocks=999),
                                           record(2, "snap", blocks, origin=1, mapped_blocks=999)]}
    write(path, uuid, state, {1: origin, 2: snap})
    report = check_pool(path)
    assert report.ok, report.problems
    assert (report.transaction, report.mappings, report.used_blocks) == (5, 5, 3)
    with Pool.open(path) as pool:
        assert pool.transaction_id == 5
        assert pool.space.counts[10:13].tolist() == [1, 1, 1]  # leaves mapping it, not devices
        assert [(d.name, d.mapped_blocks) for d in pool.volumes()] == [("origin", 2), ("snap", 3)]
        snap_dev = pool.volume("snap")
        assert pool.read(snap_dev.dev_id, 0, BS) == pool.read(pool.volume("origin").dev_id, 0, BS)


def test_write_new_with_no_devices_is_a_new_pool(tmp_path):
    path, uuid = empty_pool(tmp_path)
    write(path, uuid, None, None, txn=1)
    assert check_pool(path).ok
    with Pool.open(path) as pool:
        assert pool.volumes() == [] and pool.transaction_id == 1 and pool.space.used == 0


def test_write_new_never_overwrites_and_leaves_nothing_when_it_fails(tmp_path):
    path, uuid = empty_pool(tmp_path)
    meta = os.path.join(path, METADATA)
    with open(meta, "wb") as f:
        f.write(b"not ours")
    with pytest.raises(FileExistsError):
        write(path, uuid, None, None)
    with open(meta, "rb") as f:
        assert f.read() == b"not ours"
    os.unlink(meta)
    beyond = Node(0, array("Q", leaf({0: (NR_BLOCKS, 0)}).entries))
    with pytest.raises(ValueError, match="beyond the pool"):
        write(path, uuid, {"devices": [record(1, "v", 4)]}, {1: beyond})
    assert not os.path.exists(meta)
    with pytest.raises(MetadataFull):  # fails once the file exists: the commit does not fit
        MetadataStore.write_new(meta, uuid=uuid, transaction_id=1, time=0, block_size=BS,
                                nr_data_blocks=NR_BLOCKS, nr_meta_pages=3)
    assert not os.path.exists(meta)


def test_repair_of_forged_sharing_at_every_position_is_bounded(tmp_path):
    """A forged tree whose root names one level-1 node 512 times, which names one leaf 512
    times: the leaf sits at 262,144 virtual positions.  Repair copies a subtree reached at a
    second position only up to the number of pages it read (else ~1 GiB of leaf copies) and
    drops the rest; the repaired pool checks clean."""
    from fusepool.check import repair

    path, uuid = empty_pool(tmp_path)
    lf = leaf({0: (1, 0)})
    middle = Node(1, [lf] * FANOUT)
    root = Node(2, [middle] * FANOUT)
    lf.share, middle.share = FANOUT, FANOUT
    write(path, uuid, {"next_dev_id": 2, "devices": [record(1, "v", FANOUT * FANOUT)]}, {1: root})
    assert not check_pool(path).ok  # one block mapped at 262,144 virtual blocks
    said = repair(path)
    assert any("already placed elsewhere dropped" in line for line in said), said
    assert check_pool(path).ok
    with Pool.open(path, readonly=True) as pool:
        v = pool.volume("v")
        assert v.mapped_blocks <= 4
        assert len(pool.read(v.dev_id, 0, 4 * BS)) == 4 * BS
