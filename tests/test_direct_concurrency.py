"""Concurrent writers on a direct-mode pool, through a real mount (fusepool/directio.py).

In direct mode the daemon serves several requests at once, their I/O in
worker threads; the bio prison keeps two writes to one block apart and a
snapshot waits for the writes in flight.  Several processes write interleaved
partial pieces of the same 64 KiB blocks (1 KiB each: four writers share every
4 KiB sector; copies-on-write after every snapshot) while
snapshots are taken; two more write and read back a volume each.  Model
check: every acknowledged write is in the final contents, and each snapshot
shows, for each writer, the state after some prefix of its writes that
contains every write acknowledged before the snapshot began and none begun
after it returned.  (A piece never crosses a page: the kernel sends a write
across a page it does not hold as two requests, which a snapshot may split.)
With the kernel's writeback cache several WRITEs of one volume reach the
daemon at once: without the prison, pieces are lost there.
"""

import random
import subprocess
import sys
import time

import pytest
from conftest import read_all, run_fusepool
from test_space import check_clean

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB
SIZE = 16 * BS
PIECE = 1024  # within a page: the kernel sends each pwrite as one request
SLOTS = SIZE // PIECE
NPROC = 4
ROUNDS = 250

WRITER = r"""
import os, random, sys, time
path, log = sys.argv[1], sys.argv[6]
p, nproc, rounds, piece = (int(a) for a in sys.argv[2:6])
slots = [s for s in range(os.path.getsize(path) // piece) if s % nproc == p]
rng = random.Random(p)
fd = os.open(path, os.O_WRONLY)
out = []
for i in range(rounds):
    s = rng.choice(slots)
    data = random.Random(f"{p}-{i}").randbytes(piece)
    t0 = time.monotonic()
    assert os.pwrite(fd, data, s * piece) == piece
    out.append(f"{s} {t0} {time.monotonic()}")
os.close(fd)
with open(log, "w") as f:
    f.write("\n".join(out))
"""

CHECKER = r"""
import os, random, sys
path, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
size = os.path.getsize(path)
model = {}
fd = os.open(path, os.O_RDWR)
for i in range(rounds):
    off = rng.randrange(size // 4096) * 4096
    if rng.random() < 0.5:
        data = rng.randbytes(4096)
        assert os.pwrite(fd, data, off) == 4096
        model[off] = data
    else:
        got = os.pread(fd, 4096, off)
        assert got == model.get(off, bytes(4096)), f"read at {off} differs from the model"
os.close(fd)
"""


def piece_data(p: int, i: int) -> bytes:
    return random.Random(f"{p}-{i}").randbytes(PIECE)


def check_snapshot(content: bytes, logs: list, t0: float, t1: float, name: str) -> None:
    """Per writer: the snapshot is its state after a prefix of its writes (see module doc)."""
    for p, writes in enumerate(logs):
        slots = [s for s in range(SLOTS) if s % NPROC == p]
        lo = sum(1 for _s, _a, end in writes if end < t0)
        hi = sum(1 for _s, start, _e in writes if start < t1)
        state = {s: bytes(PIECE) for s in slots}
        for i in range(lo):
            state[writes[i][0]] = piece_data(p, i)
        got = {s: content[s * PIECE : (s + 1) * PIECE] for s in slots}
        j = lo
        while got != state:
            if j >= hi:  # say how far off the closest prefix is
                index = {piece_data(p, i): i for i in range(len(writes))}
                index[bytes(PIECE)] = -1
                best = None
                st = {s: bytes(PIECE) for s in slots}
                for k in range(hi + 1):
                    if k:
                        st[writes[k - 1][0]] = piece_data(p, k - 1)
                    if k >= lo:
                        d = [(s, index.get(st[s], "?"), index.get(got[s], "?")) for s in slots
                             if got[s] != st[s]]
                        if best is None or len(d) < len(best[1]):
                            best = (k, d)
                diff = best
            assert j < hi, (f"snapshot {name}: writer {p} shows no prefix of its writes between "
                            f"{lo} (done before) and {hi} (begun before it returned): "
                            f"closest prefix, (slot, write expected, write found): {diff}")
            state[writes[j][0]] = piece_data(p, j)
            j += 1


@pytest.mark.parametrize("io", ["threads", "adaptive"])
@pytest.mark.parametrize("cache", ["write-through", "writeback"])
def test_concurrent_partial_writes_and_snapshots(make_pool, make_mount, tmp_path, cache, io,
                                                 monkeypatch):
    if io == "threads":  # every I/O step in a worker thread, however fast the disk
        monkeypatch.setenv("FUSEPOOL_DIRECT_INLINE_US", "0")
    pool = make_pool("pool", "--data-size", "64M", "--metadata-size", "16M", "--min-free-space", "0%",
                     "--preallocate")
    m = make_mount(pool, *(["--write-through"] if cache == "write-through" else []))
    run_fusepool("create", pool, "v", "--size", str(SIZE))
    for seed in range(2):
        run_fusepool("create", pool, f"w{seed}", "--size", "4M")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(m.vol("v")), str(p), str(NPROC),
                                 str(ROUNDS), str(PIECE), str(tmp_path / f"log{p}")])
               for p in range(NPROC)]
    checkers = [subprocess.Popen([sys.executable, "-c", CHECKER, str(m.vol(f"w{seed}")), str(seed),
                                 "400"])
                for seed in range(2)]
    snaps = []
    while any(w.poll() is None for w in writers) and len(snaps) < 8:
        time.sleep(0.05)
        t0 = time.monotonic()
        name = f"s{len(snaps)}"
        run_fusepool("snapshot", pool, "v", name)
        snaps.append((name, t0, time.monotonic()))
    for proc in writers + checkers:
        assert proc.wait(timeout=300) == 0
    logs = []
    for p in range(NPROC):
        with open(tmp_path / f"log{p}") as f:
            logs.append([(int(s), float(a), float(b)) for s, a, b in
                         (line.split() for line in f.read().splitlines())])
    # Every acknowledged write is there: each slot holds its writer's last write to it.
    final = bytearray(SIZE)
    for p, writes in enumerate(logs):
        for i, (s, _a, _b) in enumerate(writes):
            final[s * PIECE : (s + 1) * PIECE] = piece_data(p, i)
    assert read_all(m.vol("v"), 0, SIZE) == bytes(final)
    assert snaps, "no snapshot was taken while the writers ran"
    for name, t0, t1 in snaps:
        content = read_all(m.vol(name), 0, SIZE)
        if cache == "write-through":
            check_snapshot(content, logs, t0, t1, name)
        else:
            # The kernel's cache writes pages back in its own order: each piece is one the
            # slot held, and everything acknowledged before the snapshot's flush is there.
            for p, writes in enumerate(logs):
                seen = {s: {bytes(PIECE)} for s in range(p, SLOTS, NPROC)}
                for i, (s, _a, _b) in enumerate(writes):
                    seen[s].add(piece_data(p, i))
                for s, values in seen.items():
                    assert content[s * PIECE : (s + 1) * PIECE] in values, (name, s)
    m.umount()
    check_clean(pool)
    m.mount()
    assert read_all(m.vol("v"), 0, SIZE) == bytes(final)

