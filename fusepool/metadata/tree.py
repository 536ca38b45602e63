"""Copy-on-write mapping trees: one per thin device, nodes shared between snapshots.

A device's mapping is a radix tree of :class:`Node` s with ``FANOUT`` entries
per node (one metadata page each).  Leaves hold packed ``block << 24 | time``
entries; internal nodes hold child nodes.  This is dm-thin's design without
the B-tree keys: virtual block ``v`` lives in leaf ``v // FANOUT`` at slot
``v % FANOUT``, so a lookup costs one list index per level and one array index.

Sharing, as in dm-thin's transaction manager:

- ``Node.share`` counts the parents (nodes or device roots) that point at it.
  A snapshot just points the new device at the origin's root and bumps its
  share count: O(1) whatever the volume size.
- A node with ``share > 1`` is never modified.  Writing through it first
  *shadows* it: copy the node, increment the share count of each child (or the
  reference count of each data block, for a leaf), decrement the original.
- A data block's reference count counts leaves, not devices.  A block is
  exclusive to a device iff every node on its path has ``share == 1`` and the
  block's count is 1.

A node whose ``page`` is ``None`` is dirty: it is written to a fresh page at
the next commit.  Dirtying a node dirties its whole path (we only modify
through :func:`writable_leaf`), so a clean node has only clean descendants.
"""

from array import array
from collections.abc import Callable, Iterator

from fusepool.metadata.format import FANOUT, TIME_BITS, TIME_MASK, UNMAPPED

_EMPTY_LEAF = array("Q", [UNMAPPED]) * FANOUT


class Node:
    """One page of a mapping tree."""

    __slots__ = ("level", "entries", "share", "page")

    def __init__(self, level: int, entries=None, page: int | None = None):
        self.level = level
        if entries is None:
            entries = array("Q", _EMPTY_LEAF) if level == 0 else [None] * FANOUT
        self.entries = entries  # array('Q') in a leaf, list[Node | None] otherwise
        self.share = 1
        self.page = page


def height_for(nr_blocks: int) -> int:
    """Level of the root needed to address ``nr_blocks`` virtual blocks."""
    level, span = 0, FANOUT
    while span < nr_blocks:
        level += 1
        span *= FANOUT
    return level


def grown(root: Node | None, nr_blocks: int) -> Node | None:
    """``root`` with levels added on top until it addresses ``nr_blocks`` (the old root's
    share count moves from its device to the new top)."""
    if root is None:
        return None
    while FANOUT ** (root.level + 1) < nr_blocks:
        top = Node(root.level + 1)
        top.entries[0] = root
        root = top
    return root


def pack(block: int, time: int) -> int:
    return (block << TIME_BITS) | (time & TIME_MASK)


def unpack(entry: int) -> tuple[int, int]:
    return entry >> TIME_BITS, entry & TIME_MASK


class Tree:
    """Operations on mapping trees that need the pool's bookkeeping callbacks.

    ``inc_block``/``dec_block`` adjust data block reference counts;
    ``release_page`` is told when a committed node page stops being referenced
    by the in-memory state (so the store may reuse it after the next commit).
    """

    def __init__(self, inc_block: Callable[[int], None], dec_block: Callable[[int], None],
                 release_page: Callable[[int], None]):
        self.inc_block = inc_block
        self.dec_block = dec_block
        self.release_page = release_page
        self.dirtied = 0  # nodes made dirty since the last commit: pages it will need

    # --- reading -------------------------------------------------------------

    @staticmethod
    def leaf(root: Node | None, leaf_index: int) -> Node | None:
        """The leaf holding virtual blocks ``leaf_index * FANOUT ...``, or None."""
        node = root
        if node is None:
            return None
        level = node.level
        if leaf_index >= FANOUT**level:  # a root at level L has FANOUT**L leaves below it
            return None
        while level:
            node = node.entries[(leaf_index // FANOUT ** (level - 1)) % FANOUT]
            if node is None:
                return None
            level -= 1
        return node

    @staticmethod
    def leaf_is_shared(root: Node | None, leaf_index: int) -> bool:
        """True if any node on the path to that leaf is shared with another parent."""
        node = root
        level = node.level
        while True:
            if node.share > 1:
                return True
            if not level:
                return False
            node = node.entries[(leaf_index // FANOUT ** (level - 1)) % FANOUT]
            level -= 1

    @staticmethod
    def leaves(root: Node | None, shared: bool = False) -> Iterator[tuple[int, Node, bool]]:
        """Yield ``(leaf_index, leaf, path_shared)`` for every leaf, in order."""
        if root is None:
            return
        stack = [(root, 0, shared or root.share > 1)]
        while stack:
            node, base, path_shared = stack.pop()
            if node.level == 0:
                yield base, node, path_shared
                continue
            span = FANOUT ** (node.level - 1)
            for i in range(FANOUT - 1, -1, -1):
                child = node.entries[i]
                if child is not None:
                    stack.append((child, base + i * span, path_shared or child.share > 1))

    # --- writing -------------------------------------------------------------

    def grow(self, root: Node | None, nr_blocks: int) -> Node | None:
        """Add levels on top of ``root`` until it addresses ``nr_blocks``."""
        return grown(root, nr_blocks)

    def _dirty(self, node: Node) -> None:
        if node.page is not None:
            self.release_page(node.page)
            node.page = None
            self.dirtied += 1

    def shadow(self, node: Node) -> Node:
        """An unshared, dirty copy of ``node``; the original loses one parent."""
        if node.level == 0:
            copy = Node(0, array("Q", node.entries))
            inc = self.inc_block
            for entry in node.entries:
                if entry != UNMAPPED:
                    inc(entry >> TIME_BITS)
        else:
            copy = Node(node.level, list(node.entries))
            for child in node.entries:
                if child is not None:
                    child.share += 1
        self.drop(node)
        self.dirtied += 1
        return copy

    def writable_leaf(self, root: Node | None, level: int, leaf_index: int) -> tuple[Node, Node]:
        """Make the path to a leaf private and dirty; return ``(new_root, leaf)``.

        ``level`` is the root level the device needs (used when ``root`` is None).
        """
        if root is None:
            root = Node(level)
            self.dirtied += 1
        elif root.share > 1:
            root = self.shadow(root)
        elif root.page is not None:
            self._dirty(root)
        node = root
        level = node.level
        while level:
            i = (leaf_index // FANOUT ** (level - 1)) % FANOUT
            child = node.entries[i]
            if child is None:
                child = node.entries[i] = Node(level - 1)
                self.dirtied += 1
            elif child.share > 1:
                child = node.entries[i] = self.shadow(child)
            elif child.page is not None:
                self._dirty(child)
            node = child
            level -= 1
        return root, node

    def drop(self, node: Node) -> None:
        """Remove one parent reference; free the subtree when none is left."""
        stack = [node]
        while stack:
            node = stack.pop()
            node.share -= 1
            if node.share:
                continue
            if node.page is not None:
                self.release_page(node.page)
                node.page = None
            if node.level == 0:
                dec = self.dec_block
                for entry in node.entries:
                    if entry != UNMAPPED:
                        dec(entry >> TIME_BITS)
            else:
                stack.extend(child for child in node.entries if child is not None)


class LeafCursor:
    """A device's mapping entries, looked up in increasing virtual-block order.

    Consecutive blocks share a leaf, so the tree is walked once per FANOUT
    blocks, not once per block: the loop that read, write, the journal and
    dump all need, written once.  ``shared`` says whether the current leaf's
    path is shared with another device (asked for by the write path only).
    """

    __slots__ = ("root", "index", "leaf", "shared", "_with_sharing")

    def __init__(self, root: Node | None, with_sharing: bool = False):
        self.root = root
        self.index = -1
        self.leaf: Node | None = None
        self.shared = False
        self._with_sharing = with_sharing

    def entry(self, vb: int) -> int:
        """The entry of virtual block ``vb`` (UNMAPPED if none)."""
        index = vb // FANOUT
        if index != self.index:
            self.index = index
            self.leaf = Tree.leaf(self.root, index)
            if self._with_sharing:
                self.shared = self.leaf is not None and Tree.leaf_is_shared(self.root, index)
        leaf = self.leaf
        return leaf.entries[vb % FANOUT] if leaf is not None else UNMAPPED


class WritableLeafCursor:
    """Like :class:`LeafCursor`, for changing entries: each leaf reached is made
    private and dirty (``Tree.writable_leaf``), and ``root`` follows the shadowing."""

    __slots__ = ("tree", "root", "level", "index", "leaf")

    def __init__(self, tree: "Tree", root: Node | None, level: int):
        self.tree = tree
        self.root = root
        self.level = level
        self.index = -1
        self.leaf: Node | None = None

    def leaf_for(self, vb: int) -> Node:
        """The writable leaf holding ``vb`` (its slot is ``vb % FANOUT``)."""
        index = vb // FANOUT
        if index != self.index:
            self.index = index
            self.root, self.leaf = self.tree.writable_leaf(self.root, self.level, index)
        return self.leaf
