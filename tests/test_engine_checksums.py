"""Engine, DESIGN.md section 1 "Durability": metadata checksums.

Corruption of any metadata page (payload or header, or a valid page at the
wrong place) is detected at open and never used; a damaged newest superblock
falls back to the previous commit; damage outside the newest commit is
harmless.  No FUSE: fusepool.engine.Pool and the metadata store directly.
"""

import os

import pytest
from engine_helpers import BS, new_pool, read_superblocks_of
from engine_model import check_invariants

from fusepool.engine import Pool
from fusepool.errors import Corrupt
from fusepool.metadata.format import FANOUT, PAGE_SIZE
from fusepool.metadata.store import MetadataStore
from fusepool.metadata.tree import Tree


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _pages_of(path: str) -> dict:
    """Page numbers of the newest commit, by kind."""
    store, loaded = MetadataStore.open(os.path.join(path, "metadata"), readonly=True)
    try:
        sb = loaded.superblock
        big = next(d for d in loaded.state["devices"] if d["name"] == "big")
        root = loaded.roots[big["dev_id"]]
        assert root.level >= 1
        leaf = Tree.leaf(root, 0)
        return {
            "superblock": sb.transaction_id % 2,
            "root_record": sb.root_pages[0],
            "spacemap": store.spacemap_pages[0],
            "internal_node": root.page,
            "leaf_node": leaf.page,
        }
    finally:
        store.close()


def _pool_for_corruption(tmp_path) -> str:
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        big = pool.create_volume("big", (FANOUT + 10) * BS)
        pool.write(big.dev_id, 0, b"first")
        pool.write(big.dev_id, (FANOUT + 1) * BS, b"second")
    return path


@pytest.mark.parametrize("kind", ["root_record", "spacemap", "internal_node", "leaf_node"])
@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupt_page_is_detected(tmp_path, kind, where):
    path = _pool_for_corruption(tmp_path)
    page = _pages_of(path)[kind]
    meta = os.path.join(path, "metadata")
    offset = page * PAGE_SIZE + (100 if where == "payload" else 2)
    flip_byte(meta, offset)
    with pytest.raises(Corrupt, match="check|repair"):
        Pool.open(path)
    # The failed open released the lock; undoing the damage makes the pool usable again.
    flip_byte(meta, offset)
    with Pool.open(path) as pool:
        big = pool.volume("big")
        assert pool.read(big.dev_id, 0, 5) == b"first"
        assert pool.read(big.dev_id, (FANOUT + 1) * BS, 6) == b"second"
        check_invariants(pool)


def test_page_written_to_wrong_place_is_detected(tmp_path):
    """The checksum is seeded with the page number: a valid page copied elsewhere fails."""
    path = _pool_for_corruption(tmp_path)
    pages = _pages_of(path)
    meta = os.path.join(path, "metadata")
    with open(meta, "r+b") as f:
        f.seek(pages["leaf_node"] * PAGE_SIZE)
        leaf = f.read(PAGE_SIZE)
        # Swap in another valid node page: the internal node's page.
        f.seek(pages["internal_node"] * PAGE_SIZE)
        f.write(leaf)
    with pytest.raises(Corrupt):
        Pool.open(path)


def test_corrupt_newest_superblock_falls_back_to_previous_commit(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 8 * BS)
        pool.write(v.dev_id, 0, b"committed-1")
        pool.commit()
        prev_txn = pool.transaction_id
        pool.write(v.dev_id, BS, b"committed-2")
        pool.create_volume("w", BS)  # commits
        newest = pool.transaction_id
        assert newest == prev_txn + 1
    sbs = dict(read_superblocks_of(path))
    assert sbs[newest % 2].transaction_id == newest
    flip_byte(os.path.join(path, "metadata"), (newest % 2) * PAGE_SIZE + 40)
    with Pool.open(path) as pool:
        assert pool.transaction_id == prev_txn
        assert sorted(pool.names) == ["v"]
        v = pool.volume("v")
        assert pool.read(v.dev_id, 0, 11) == b"committed-1"
        assert pool.read(v.dev_id, BS, 11) == bytes(11)
        check_invariants(pool)
        # Carry on from there: the next commit replaces the damaged slot.
        pool.write(v.dev_id, 2 * BS, b"after fallback")
        pool.commit()
        assert pool.transaction_id == prev_txn + 1
    with Pool.open(path) as pool:
        v = pool.volume("v")
        assert pool.read(v.dev_id, 2 * BS, 14) == b"after fallback"
        check_invariants(pool)
    assert all(not isinstance(sb, Exception) for _, sb in read_superblocks_of(path))


def test_both_superblocks_corrupt(tmp_path):
    path = _pool_for_corruption(tmp_path)
    meta = os.path.join(path, "metadata")
    flip_byte(meta, 40)
    flip_byte(meta, PAGE_SIZE + 40)
    with pytest.raises(Corrupt):
        Pool.open(path)


def test_damage_outside_the_newest_commit_is_harmless(tmp_path):
    """Free pages are not read: damaging one must not stop the pool from opening."""
    path = _pool_for_corruption(tmp_path)
    store, loaded = MetadataStore.open(os.path.join(path, "metadata"), readonly=True)
    try:
        free = store.page_state.index(0, 2)
    finally:
        store.close()
    flip_byte(os.path.join(path, "metadata"), free * PAGE_SIZE + 100)
    with Pool.open(path) as pool:
        assert pool.read(pool.volume("big").dev_id, 0, 5) == b"first"


def test_truncated_metadata_is_corrupt_not_a_crash(tmp_path):
    path = _pool_for_corruption(tmp_path)
    meta = os.path.join(path, "metadata")
    pages = _pages_of(path)
    os.truncate(meta, max(pages.values()) * PAGE_SIZE)
    with pytest.raises(Corrupt):
        Pool.open(path)
