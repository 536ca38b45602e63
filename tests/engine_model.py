"""Test helpers for the engine tests: a reference model of volume contents,
an invariant checker over the in-memory engine state, and crash simulation.

Nothing here touches the engine's internals except to *read* them (the
checker recomputes reference counts and node share counts from the trees and
compares them with what the engine keeps); the only mutation is
:func:`crash`, which drops an open pool on the floor the way a SIGKILL would.
"""

from __future__ import annotations

import copy

from fusepool.metadata.format import FANOUT, TIME_MASK, UNMAPPED
from fusepool.metadata.tree import height_for

# --- the reference model ------------------------------------------------------


class VolumeModel:
    """What one volume must read back: a size, sparse block contents, and the
    exact set of virtual blocks the engine must have mapped.

    ``blocks`` maps a virtual block to its full contents (absent = zeros).
    Without zero detection (the default, dm-thin's behaviour) ``mapped`` is
    exactly the set of blocks the engine has mapped: every write maps the
    blocks it touches, zeros or not, and a discard unmaps the whole blocks
    inside it.  With ``zero_detection`` it is the set the engine *may* have
    mapped: a whole block of zeros unmaps, and a zero piece that leaves a block
    all zeros may or may not unmap it (the engine avoids provisioning zeros
    where that is cheap to see; see docs/design.md).  Blocks holding any
    non-zero byte *must* be mapped in both modes.
    """

    def __init__(self, size: int, block_size: int, zero_detection: bool = False):
        self.size = size
        self.bs = block_size
        self.zero_detection = zero_detection
        self.blocks: dict[int, bytearray] = {}
        self.mapped: set[int] = set()

    def clone(self) -> VolumeModel:
        return copy.deepcopy(self)

    def write(self, offset: int, data: bytes) -> None:
        bs = self.bs
        pos, end = offset, offset + len(data)
        while pos < end:
            vb = pos // bs
            lo = pos - vb * bs
            hi = min(end - vb * bs, bs)
            piece = data[pos - offset : pos - offset + hi - lo]
            if self.zero_detection and hi - lo == bs and not any(piece):
                self.blocks.pop(vb, None)
                self.mapped.discard(vb)
            else:
                block = self.blocks.get(vb)
                if block is None:
                    block = self.blocks[vb] = bytearray(bs)
                block[lo:hi] = piece
                self.mapped.add(vb)
            pos = (vb + 1) * bs
        self.size = max(self.size, end)

    def grow(self, size: int) -> None:
        """Grow to ``size``: bytes between the old and the new end read as zeros."""
        assert size >= self.size
        block = self.blocks.get(self.size // self.bs)
        if block is not None:
            block[self.size % self.bs :] = bytes(self.bs - self.size % self.bs)
        self.size = size

    def discard(self, offset: int, length: int) -> None:
        bs = self.bs
        first = (offset + bs - 1) // bs
        last = (offset + length) // bs
        for vb in range(first, last):
            self.blocks.pop(vb, None)
            self.mapped.discard(vb)

    def expected(self, offset: int, length: int) -> bytes:
        """The bytes ``read(offset, length)`` must return (clipped at the size)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        bs = self.bs
        for vb in range(offset // bs, (end - 1) // bs + 1):
            block = self.blocks.get(vb)
            if block is None:
                continue
            lo = max(offset, vb * bs)
            hi = min(end, (vb + 1) * bs)
            out[lo - offset : hi - offset] = block[lo - vb * bs : hi - vb * bs]
        return bytes(out)


def first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte (or the shorter length)."""
    n = min(len(a), len(b))
    lo, hi = 0, n
    if a[:n] == b[:n]:
        return n
    while hi - lo > 1:  # binary search on prefixes (fast in C)
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def verify_volume(pool, name: str, model: VolumeModel, chunk_blocks: int = 32) -> None:
    """Every byte of volume ``name`` equals the model; so do size and mappings."""
    dev = pool.volume(name)
    assert dev.size == model.size, f"{name}: size {dev.size} != model {model.size}"
    chunk = chunk_blocks * model.bs
    for offset in range(0, max(model.size, 1), chunk):
        got = pool.read(dev.dev_id, offset, chunk)
        want = model.expected(offset, chunk)
        if got != want:
            i = first_difference(got, want)
            raise AssertionError(
                f"{name}: byte {offset + i} (block {(offset + i) // model.bs}) reads "
                f"{got[i:i + 8]!r}, expected {want[i:i + 8]!r} (len {len(got)} vs {len(want)})")
    # Reads past the end return nothing.
    assert pool.read(dev.dev_id, model.size, 10) == b""
    mapped = {vb for vb, _, _ in pool.mappings(dev)}
    required = {vb for vb, block in model.blocks.items() if any(block)}
    assert required <= mapped <= model.mapped, (
        f"{name}: mapped blocks differ: not allowed {sorted(mapped - model.mapped)[:10]}, "
        f"missing {sorted(required - mapped)[:10]}")
    if not model.zero_detection:  # zeros are data: exactly the blocks written
        assert mapped == model.mapped, (
            f"{name}: blocks written but not mapped: {sorted(model.mapped - mapped)[:10]}")
    assert dev.mapped_blocks == len(mapped), f"{name}: mapped_blocks {dev.mapped_blocks} != {len(mapped)}"
    exclusive, shared = pool.device_usage(dev)
    assert exclusive + shared == len(mapped)


def verify_all(pool, models: dict[str, VolumeModel]) -> None:
    assert sorted(pool.names) == sorted(models), f"names {sorted(pool.names)} != {sorted(models)}"
    for name, model in models.items():
        verify_volume(pool, name, model)
    check_invariants(pool)


# --- invariants of the in-memory engine state ------------------------------------


def check_invariants(pool) -> None:
    """Recompute what the engine keeps incrementally and compare.

    - every node's ``share`` equals the number of parents (device roots and
      internal-node slots) pointing at it;
    - a data block's reference count equals the number of distinct leaves
      mapping it (format.py: "a leaf shared by several devices counts once");
    - ``used`` counts the referenced blocks; referenced blocks are busy;
    - each device's ``mapped_blocks`` counts its mappings, its tree is tall
      enough for its size, and the time model is consistent.
    """
    parents: dict[int, int] = {}
    nodes: dict[int, object] = {}
    expected_counts: dict[int, int] = {}
    nr_blocks = pool.nr_blocks
    for dev in pool.devices.values():
        root = dev.root
        assert dev.creation_time <= dev.snap_time <= pool.time, (
            f"device {dev.dev_id}: creation {dev.creation_time} snap {dev.snap_time} time {pool.time}")
        if root is None:
            assert dev.mapped_blocks == 0, f"device {dev.dev_id} has no tree but {dev.mapped_blocks} blocks"
            continue
        needed = height_for(max(1, (dev.size + pool.block_size - 1) // pool.block_size))
        assert root.level >= needed, f"device {dev.dev_id}: root level {root.level} < {needed} needed"
        parents[id(root)] = parents.get(id(root), 0) + 1
        mapped = 0
        stack = [root]
        seen_here: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen_here:
                continue
            seen_here.add(id(node))
            first_visit = id(node) not in nodes
            nodes[id(node)] = node
            if node.level == 0:
                for entry in node.entries:
                    if entry == UNMAPPED:
                        continue
                    mapped += 1
                    block = entry >> 24
                    assert block < nr_blocks, f"device {dev.dev_id} maps block {block} >= {nr_blocks}"
                    assert (entry & TIME_MASK) <= pool.time, "mapping time in the future"
                    if first_visit:
                        expected_counts[block] = expected_counts.get(block, 0) + 1
            else:
                assert len(node.entries) == FANOUT
                for child in node.entries:
                    if child is None:
                        continue
                    assert child.level == node.level - 1, "child level mismatch"
                    if first_visit:
                        parents[id(child)] = parents.get(id(child), 0) + 1
                    stack.append(child)
        assert mapped == dev.mapped_blocks, (
            f"device {dev.dev_id} ({dev.name}): mapped_blocks {dev.mapped_blocks}, tree maps {mapped}")
    for key, node in nodes.items():
        assert node.share == parents.get(key, 0), (
            f"node level {node.level} page {node.page}: share {node.share}, parents {parents.get(key, 0)}")
    counts = pool.space.counts
    assert len(counts) == nr_blocks
    bad = [(b, counts[b], expected_counts.get(b, 0)) for b in range(nr_blocks)
           if counts[b] != expected_counts.get(b, 0)]
    assert not bad, f"reference counts wrong (block, count, expected): {bad[:10]}"
    busy = pool.space.busy
    assert all(busy[b] for b in expected_counts), "a referenced block is not busy"
    assert pool.space.used == len(expected_counts), (
        f"space.used {pool.space.used} != referenced blocks {len(expected_counts)}")
    for name, dev_id in pool.names.items():
        assert pool.devices[dev_id].name == name and not pool.devices[dev_id].deleted


def crash(pool) -> None:
    """Abandon an open pool without committing, as SIGKILL would.

    Data already pwritten stays in the host page cache (a process crash, not a
    power loss), so it is visible after reopening; only the metadata that was
    not committed is lost.  Every descriptor goes, as with SIGKILL.
    """
    pool.journal.close()
    pool.data.close()
    pool.store.close()
    pool.lock.release()


def snapshot_models(models: dict[str, VolumeModel]) -> dict[str, VolumeModel]:
    return {name: m.clone() for name, m in models.items()}
