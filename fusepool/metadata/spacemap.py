"""Data block reference counts and the allocator.

``counts`` is one u32 per data block (see format.py for what a count means).
``busy`` is one byte per data block, non-zero when the block may not be
allocated: it is referenced, or it was freed in the running transaction.  A
block freed in the running transaction is never reused before that
transaction commits, because the last commit may still map it (dm-thin's
rule); :meth:`committed` releases those blocks.  ``bytearray.find`` does the
free-block search in C.

Direct mode's data path runs its I/O in worker threads (plan -> I/O ->
apply), so two more states exist there.  A *pinned* block is under I/O (read,
or written in place): freed meanwhile, it stays unallocatable, even past the
commit that frees it, until it is unpinned, so a stale read or write never meets another
volume's data (the last unpin frees it then).  A *reserved* block is allocated to a write whose I/O is in
flight: busy, but its count stays 0 until the write's mappings are in place,
so a commit meanwhile stores it free (no leak if the write never lands).
"""

from array import array

from fusepool.errors import Corrupt, PoolFull
from fusepool.metadata.format import COUNTS_PER_PAGE

_NONZERO = bytes([0] + [1] * 255)


class DataSpaceMap:
    def __init__(self, nr_blocks: int, counts: array | None = None):
        self.counts = counts if counts is not None else array("I", bytes(4 * nr_blocks))
        if len(self.counts) != nr_blocks:
            raise Corrupt(f"space map covers {len(self.counts)} blocks, pool has {nr_blocks}")
        self.busy = _busy_map(self.counts)
        self.nr_blocks = nr_blocks
        self.free = self.busy.count(0)  # blocks an allocation can take right now
        self.used = nr_blocks - self.free  # blocks with a non-zero count
        self.freed: list[int] = []  # freed in the running transaction
        self.dirty_pages: set[int] = set()
        self.cursor = 0
        self.pins: dict[int, int] = {}  # data block -> I/O in flight on it (direct mode)
        self.release_on_unpin: set[int] = set()  # freed by a durable commit while pinned

    def allocate(self) -> int:
        """A free block, now referenced once; raise :class:`PoolFull` if none."""
        i = self.busy.find(0, self.cursor)
        if i < 0:
            i = self.busy.find(0, 0, self.cursor)
            if i < 0:
                raise PoolFull("pool is out of data space")
        self.busy[i] = 1
        self.counts[i] = 1
        self.used += 1
        self.free -= 1
        self.cursor = i + 1
        self.dirty_pages.add(i // COUNTS_PER_PAGE)
        return i

    def claim(self, block: int) -> None:
        """Reference a free block chosen by the caller (journal replay)."""
        if self.counts[block] or self.busy[block]:
            raise Corrupt(f"data block {block} is not free")
        self.busy[block] = 1
        self.counts[block] = 1
        self.used += 1
        self.free -= 1
        self.dirty_pages.add(block // COUNTS_PER_PAGE)

    def unallocate(self, block: int) -> None:
        """Undo :meth:`allocate` for a block never mapped (its write failed)."""
        self.counts[block] = 0
        self.busy[block] = 0
        self.used -= 1
        self.free += 1

    def reserve(self, block: int) -> None:
        """A block just allocated for a write whose I/O is in flight: count 0, still busy."""
        self.counts[block] = 0
        self.used -= 1

    def unreserve(self, block: int) -> None:
        """A reserved block the write does not map after all (it failed, or unmapped instead)."""
        self.busy[block] = 0
        self.free += 1

    def claim_reserved(self, block: int) -> None:
        """The write's I/O is done and its mapping goes in now: referenced once."""
        self.counts[block] = 1
        self.used += 1
        self.dirty_pages.add(block // COUNTS_PER_PAGE)

    def pin(self, block: int) -> None:
        """I/O on ``block`` is in flight: if freed, keep it from reuse until :meth:`unpin`."""
        self.pins[block] = self.pins.get(block, 0) + 1

    def unpin(self, block: int) -> None:
        n = self.pins[block] - 1
        if n:
            self.pins[block] = n
            return
        del self.pins[block]
        if block in self.release_on_unpin:  # the commit that freed it is durable: free now
            self.release_on_unpin.discard(block)
            self.busy[block] = 0
            self.free += 1

    def inc(self, block: int) -> None:
        self.counts[block] += 1
        self.dirty_pages.add(block // COUNTS_PER_PAGE)

    def dec(self, block: int) -> None:
        count = self.counts[block]
        if count == 0:
            raise Corrupt(f"reference count of data block {block} would go below zero")
        self.counts[block] = count - 1
        self.dirty_pages.add(block // COUNTS_PER_PAGE)
        if count == 1:
            self.used -= 1
            self.freed.append(block)  # stays busy until the commit

    def committed(self) -> list[int]:
        """After a commit: make this transaction's freed blocks allocatable.

        Returns the blocks that are still free (the caller may punch holes).
        """
        return self.release_freed(self.take_freed())

    def take_freed(self) -> list[int]:
        """The blocks freed so far, for the commit being taken (later frees: the next one)."""
        freed, self.freed = self.freed, []
        return freed

    def release_freed(self, freed: list[int]) -> list[int]:
        """The commit that freed them is durable: make them allocatable (see committed)."""
        counts, pins = self.counts, self.pins
        released = [b for b in freed if counts[b] == 0 and b not in pins]
        if pins:  # under I/O still: allocatable once unpinned
            self.release_on_unpin.update(b for b in freed if counts[b] == 0 and b in pins)
        for block in released:
            self.busy[block] = 0
        self.free += len(released)
        return released

    def grow(self, nr_blocks: int) -> None:
        extra = nr_blocks - self.nr_blocks
        self.counts.extend(array("I", bytes(4 * extra)))
        self.busy.extend(bytes(extra))
        self.free += extra
        self.dirty_pages.update(range(self.nr_blocks // COUNTS_PER_PAGE,
                                      (nr_blocks - 1) // COUNTS_PER_PAGE + 1))
        self.nr_blocks = nr_blocks

    def page_payload(self, index: int) -> bytes:
        return self.counts[index * COUNTS_PER_PAGE : (index + 1) * COUNTS_PER_PAGE].tobytes()

    @property
    def nr_pages(self) -> int:
        return (self.nr_blocks + COUNTS_PER_PAGE - 1) // COUNTS_PER_PAGE


def _busy_map(counts: array) -> bytearray:
    """One byte per block, 1 where the count is non-zero (all in C)."""
    raw = counts.tobytes()
    n = len(counts)
    merged = 0
    for k in range(4):  # OR the four bytes of every u32 together
        merged |= int.from_bytes(raw[k::4], "little")
    return bytearray(merged.to_bytes(n, "little").translate(_NONZERO))
