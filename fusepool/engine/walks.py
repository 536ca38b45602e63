"""Reporting walks (usage, extents, dump runs, delta) in time proportional to the unique metadata.

A Docker-style pool is one base volume and a chain of snapshots that share
nearly all of its tree: walking every leaf of every device costs
devices x mappings, while the distinct nodes are hardly more than the base's.
These walks visit each distinct node once per walk, as thin_ls does:

- A node with ``share > 1`` is reachable from several parents.  What a walk
  learns about it (its mapped count, its runs, its mapped ranges) is memoised
  by node identity, so every further device that reaches it costs one lookup.
  A node reached from two devices always has such a node on its path (where
  the two paths meet), so memoising at shared nodes is enough.
- Everything under a shared node is shared, so its blocks count as shared
  without looking at them one by one (the brute-force rule, kept exactly:
  a block is shared iff a node on its path is shared or its reference count
  in the space map is above 1).
- ``delta`` walks two trees side by side and stops where they hold the same
  node object: one node cannot differ from itself.

A :class:`Walk` holds one walk's memo; it is valid only while the trees do
not change (one reporting call; the memo is keyed by ``id(node)``).
``visits`` counts the nodes whose entries were examined, so tests can check
the work done without timing it.  The brute-force versions these must equal
stay in :class:`fusepool.engine.stats.Statistics` (``device_usage``,
``extents``, ``mappings``) and :func:`fusepool.interop.images.delta`.
"""

from array import array
from collections.abc import Callable, Iterable

from fusepool.metadata.format import FANOUT, TIME_BITS, TIME_MASK, UNMAPPED
from fusepool.metadata.tree import Node

Run = tuple[int, int, int, int]  # (virtual_begin, data_begin, length, time): thin_dump's runs
Progress = Callable[[int, int], None] | None  # (devices done, devices in all)

_STEP = 1 << TIME_BITS  # the entry difference of two neighbouring data blocks, same time


def _ramp(first: int) -> array:
    """The entries of a full leaf on contiguous data blocks, one mapping time."""
    return array("Q", range(first, first + FANOUT * _STEP, _STEP))


def _is_one_run(entries) -> bool:
    """True when a leaf is full, on contiguous data blocks, with one time (the usual case)."""
    first = entries[0]
    # the cheap test first; the last entry fits in 64 bits, so the ramp does too
    return (first != UNMAPPED and entries[-1] == first + (FANOUT - 1) * _STEP
            and entries == _ramp(first))


def _leaf_runs(entries, base: int) -> list[Run]:
    if _is_one_run(entries):
        first = entries[0]
        return [(base, first >> TIME_BITS, FANOUT, first & TIME_MASK)]
    runs: list[Run] = []
    v0 = d0 = n = t0 = -1
    for slot, entry in enumerate(entries):
        if entry == UNMAPPED:
            continue
        vb, db, t = base + slot, entry >> TIME_BITS, entry & TIME_MASK
        if n > 0 and v0 + n == vb and d0 + n == db and t0 == t:
            n += 1
            continue
        if n > 0:
            runs.append((v0, d0, n, t0))
        v0, d0, n, t0 = vb, db, 1, t
    if n > 0:
        runs.append((v0, d0, n, t0))
    return runs


def _append_runs(out: list[Run], more: list[Run]) -> None:
    """``out + more`` as maximal runs: only the pair at the seam can merge."""
    if not more:
        return
    if out:
        v, d, n, t = out[-1]
        v2, d2, n2, t2 = more[0]
        if v + n == v2 and d + n == d2 and t == t2:
            out[-1] = (v, d, n + n2, t)
            out.extend(more[1:])
            return
    out.extend(more)


def _leaf_ranges(entries, base: int) -> list[tuple[int, int]]:
    """``(begin, length)`` ranges of mapped virtual blocks in a leaf."""
    if entries.count(UNMAPPED) == 0:
        return [(base, FANOUT)]
    ranges: list[tuple[int, int]] = []
    begin = n = 0
    for slot, entry in enumerate(entries):
        if entry == UNMAPPED:
            if n:
                ranges.append((begin, n))
                n = 0
        elif n:
            n += 1
        else:
            begin, n = base + slot, 1
    if n:
        ranges.append((begin, n))
    return ranges


def _append_ranges(out: list[tuple[int, int]], more: list[tuple[int, int]]) -> None:
    if not more:
        return
    if out and out[-1][0] + out[-1][1] == more[0][0]:
        out[-1] = (out[-1][0], out[-1][1] + more[0][1])
        out.extend(more[1:])
    else:
        out.extend(more)


class Walk:
    """One reporting walk over any number of devices of one pool (memo by node identity).

    ``counts`` is the space map's reference counts (``pool.space.counts``).
    """

    def __init__(self, counts):
        self.counts = counts
        self.visits = 0  # nodes whose entries were examined (a memo hit is not a visit)
        self._mapped: dict[int, int] = {}
        self._runs: dict[tuple[int, int], list[Run]] = {}
        self._ranges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    # --- counts: list, thin_ls, inspect ----------------------------------------------------

    def mapped(self, node: Node) -> int:
        """Mapped blocks under ``node``."""
        shared = node.share > 1
        if shared:
            hit = self._mapped.get(id(node))
            if hit is not None:
                return hit
        self.visits += 1
        if node.level == 0:
            n = FANOUT - node.entries.count(UNMAPPED)
        else:
            n = sum(self.mapped(child) for child in node.entries if child is not None)
        if shared:
            self._mapped[id(node)] = n
        return n

    def usage(self, root: Node | None) -> tuple[int, int]:
        """``(exclusive, shared)`` mapped blocks of the device with this root."""
        if root is None:
            return 0, 0
        if root.share > 1:
            return 0, self.mapped(root)
        self.visits += 1
        if root.level == 0:
            counts = self.counts
            blocks = [entry >> TIME_BITS for entry in root.entries if entry != UNMAPPED]
            shared = sum(1 for b in blocks if counts[b] > 1)
            return len(blocks) - shared, shared
        exclusive = shared = 0
        for child in root.entries:
            if child is not None:
                e, s = self.usage(child)
                exclusive += e
                shared += s
        return exclusive, shared

    # --- runs: dump ------------------------------------------------------------------------

    def runs(self, root: Node | None) -> list[Run]:
        """The device's mappings as maximal thin_dump runs (contiguous blocks, one time)."""
        return [] if root is None else list(self._subtree_runs(root, 0))

    def _subtree_runs(self, node: Node, base: int) -> list[Run]:
        # The list returned may be the memo's own: callers copy, never change it.
        shared = node.share > 1
        if shared:
            hit = self._runs.get((id(node), base))
            if hit is not None:
                return hit
        self.visits += 1
        if node.level == 0:
            runs = _leaf_runs(node.entries, base)
        else:
            runs = []
            span = FANOUT ** node.level  # virtual blocks under each child
            for i, child in enumerate(node.entries):
                if child is not None:
                    _append_runs(runs, self._subtree_runs(child, base + i * span))
        if shared:
            self._runs[(id(node), base)] = runs
        return runs

    # --- extents: map ----------------------------------------------------------------------

    def extents(self, root: Node | None) -> list[dict]:
        """Pool.extents: runs of contiguous virtual and data blocks with one sharing state."""
        out: list[list] = []  # [virtual_block, data_block, blocks, shared]

        def add(vb: int, db: int, n: int, shared: bool) -> None:
            if out:
                last = out[-1]
                if last[3] == shared and last[0] + last[2] == vb and last[1] + last[2] == db:
                    last[2] += n
                    return
            out.append([vb, db, n, shared])

        def walk(node: Node, base: int) -> None:
            if node.share > 1:  # all shared: its runs, times ignored
                for vb, db, n, _ in self._subtree_runs(node, base):
                    add(vb, db, n, True)
                return
            self.visits += 1
            if node.level == 0:
                counts = self.counts
                for slot, entry in enumerate(node.entries):
                    if entry != UNMAPPED:
                        block = entry >> TIME_BITS
                        add(base + slot, block, 1, counts[block] > 1)
                return
            span = FANOUT ** node.level  # virtual blocks under each child
            for i, child in enumerate(node.entries):
                if child is not None:
                    walk(child, base + i * span)

        if root is not None:
            walk(root, 0)
        return [{"virtual_block": v, "data_block": d, "blocks": n, "shared": s} for v, d, n, s in out]

    # --- delta -----------------------------------------------------------------------------

    def mapped_ranges(self, node: Node, base: int) -> list[tuple[int, int]]:
        """``(begin, length)`` ranges of mapped virtual blocks under ``node`` (memo: don't change)."""
        shared = node.share > 1
        if shared:
            hit = self._ranges.get((id(node), base))
            if hit is not None:
                return hit
        self.visits += 1
        if node.level == 0:
            ranges = _leaf_ranges(node.entries, base)
        else:
            ranges = []
            span = FANOUT ** node.level  # virtual blocks under each child
            for i, child in enumerate(node.entries):
                if child is not None:
                    _append_ranges(ranges, self.mapped_ranges(child, base + i * span))
        if shared:
            self._ranges[(id(node), base)] = ranges
        return ranges

    def delta(self, left: Node | None, right: Node | None) -> list[dict]:
        """images.delta of two devices' mappings, walking only where their trees differ."""
        out: list[dict] = []

        def emit(kind: str, begin: int, length: int) -> None:
            if out:
                last = out[-1]
                if last["kind"] == kind and last["begin"] + last["length"] == begin:
                    last["length"] += length
                    return
            out.append({"kind": kind, "begin": begin, "length": length})

        def whole(kind: str, node: Node, base: int) -> None:
            for begin, length in self.mapped_ranges(node, base):
                emit(kind, begin, length)

        def child(node: Node | None, level: int, i: int) -> Node | None:
            if node is None or node.level < level:  # a shorter tree sits at index 0 (Tree.grow)
                return node if i == 0 else None
            return node.entries[i]

        def diff(a: Node | None, b: Node | None, level: int, base: int) -> None:
            if a is b:  # one node object (or both absent): no difference below
                if a is not None:
                    whole("same", a, base)
                return
            if b is None:
                whole("left_only", a, base)
                return
            if a is None:
                whole("right_only", b, base)
                return
            self.visits += 1
            if level == 0:
                ea, eb = a.entries, b.entries
                if ea == eb:
                    whole("same", a, base)
                    return
                for slot in range(FANOUT):
                    x, y = ea[slot], eb[slot]
                    if x == UNMAPPED:
                        if y != UNMAPPED:
                            emit("right_only", base + slot, 1)
                    elif y == UNMAPPED:
                        emit("left_only", base + slot, 1)
                    else:
                        emit("same" if x >> TIME_BITS == y >> TIME_BITS else "different", base + slot, 1)
                return
            span = FANOUT ** level
            for i in range(FANOUT):
                ca, cb = child(a, level, i), child(b, level, i)
                if ca is not None or cb is not None:
                    diff(ca, cb, level - 1, base + i * span)

        levels = [n.level for n in (left, right) if n is not None]
        if levels:
            diff(left, right, max(levels), 0)
        return out


# --- the functions callers use ---------------------------------------------------------------

def usage(pool, devices: Iterable, progress: Progress = None,
          walk: Walk | None = None) -> dict[int, tuple[int, int]]:
    """``{dev_id: (exclusive, shared)}`` for ``devices``, in one walk (``walk``: go on with it)."""
    devices = list(devices)
    walk = walk or Walk(pool.space.counts)
    out = {}
    for done, dev in enumerate(devices, 1):
        out[dev.dev_id] = walk.usage(dev.root)
        if progress:
            progress(done, len(devices))
    return out


def device_usage(pool, dev) -> tuple[int, int]:
    """``(exclusive, shared)`` of one device (Pool.device_usage's figures)."""
    return Walk(pool.space.counts).usage(dev.root)


def describe_all(pool, devices: Iterable, progress: Progress = None) -> list[dict]:
    """Pool.describe(dev) of every device, the usage taken in one walk."""
    devices = list(devices)
    figures = usage(pool, devices, progress)
    return [pool.describe(dev, usage=False) | dict(zip(("exclusive_blocks", "shared_blocks"),
                                                        figures[dev.dev_id], strict=True))
            for dev in devices]


def extents(pool, dev) -> list[dict]:
    """Pool.extents(dev), shared subtrees taken as runs."""
    return Walk(pool.space.counts).extents(dev.root)


def device_runs(pool, devices: Iterable, progress: Progress = None,
                walk: Walk | None = None) -> dict[int, list[Run]]:
    """``{dev_id: runs}``: thin_dump's runs of every device, a shared subtree's made once."""
    devices = list(devices)
    walk = walk or Walk(pool.space.counts)
    out = {}
    for done, dev in enumerate(devices, 1):
        out[dev.dev_id] = walk.runs(dev.root)
        if progress:
            progress(done, len(devices))
    return out


def delta(pool, left, right) -> list[dict]:
    """thin_delta's ranges between two devices (images.delta's result)."""
    return Walk(pool.space.counts).delta(left.root, right.root)
