"""Reporting that scales (issue #11, part 4): fusepool.engine.walks against brute force.

The memoised walks (list, thin_ls, map, dump runs, delta) must give exactly
what the walks of every leaf of every device give (Pool.device_usage,
Pool.extents, thin_xml.runs_of over Pool.mappings, images.delta), and must
do work proportional to the distinct nodes, not to devices x mappings.  Work
is counted in node visits (``Walk.visits``), never timed: tools/bench times
the full-size case (1,000,000 blocks x 1,000 snapshots) through the CLI.
Engine only: no FUSE.
"""

import random

import pytest

from fusepool import commands
from fusepool.engine import Pool, walks
from fusepool.interop.images import delta as brute_delta
from fusepool.interop.thin_xml import dump, runs_of, write_xml
from fusepool.metadata.format import FANOUT

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB


def new_pool(tmp_path, data_blocks: int, metadata_size: int = 16 * MiB) -> str:
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=data_blocks * BS, metadata_size=metadata_size, block_size=BS,
                min_free_space=0)
    return path


def populate(pool, name: str, n: int):
    """A volume of ``n`` mapped blocks on fresh data blocks (mappings only, as tools/benchlib does)."""
    dev = pool.create_volume(name, n * BS)
    step = 50_000
    for start in range(0, n, step):
        pool._remap(dev, [(vb, pool.space.allocate()) for vb in range(start, min(n, start + step))])
    pool.commit()
    return dev


def docker_chain(pool, n_blocks: int, layers: int, seed: int = 1) -> list:
    """A base of ``n_blocks`` and a chain of ``layers`` snapshots, each a snapshot of the one
    before with one real copy-on-write write (a Docker image's layers).  Returns the devices."""
    rnd = random.Random(seed)
    devs = [populate(pool, "base", n_blocks)]
    for i in range(layers):
        dev = pool.snapshot(devs[-1].name, f"layer{i}")
        pool.write(dev.dev_id, rnd.randrange(n_blocks) * BS + rnd.randrange(BS), b"x")
        devs.append(dev)
    pool.commit()
    return devs


def distinct_nodes(roots) -> int:
    seen, stack = set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.level:
            stack.extend(c for c in node.entries if c is not None)
    return len(seen)


def tree_nodes(root) -> int:
    """Nodes a walk of this one tree meets (what the brute-force walks visit per device)."""
    if root is None:
        return 0
    return 1 + (sum(tree_nodes(c) for c in root.entries if c is not None) if root.level else 0)


def assert_matches_brute_force(pool) -> None:
    devices = sorted(pool.devices.values(), key=lambda d: d.dev_id)
    walk = walks.Walk(pool.space.counts)
    usage = walks.usage(pool, devices, walk=walk)
    runs = walks.device_runs(pool, devices, walk=walk)  # one walk serves every report
    for dev in devices:
        assert usage[dev.dev_id] == pool.device_usage(dev), dev.name
        assert walks.device_usage(pool, dev) == pool.device_usage(dev), dev.name
        assert walks.extents(pool, dev) == pool.extents(dev), dev.name
        assert walk.extents(dev.root) == pool.extents(dev), dev.name
        assert runs[dev.dev_id] == runs_of(pool.mappings(dev)), dev.name
    for a in devices:
        for b in devices:
            want = brute_delta([(v, d) for v, d, _ in pool.mappings(a)],
                               [(v, d) for v, d, _ in pool.mappings(b)])
            assert walks.delta(pool, a, b) == want, (a.name, b.name)
    # the commands that use them give what the brute-force walks give
    assert commands.run(pool, "list", {}) == [pool.describe(d) for d in pool.volumes()]
    rows = commands.run(pool, "thin_ls", {})
    assert [(r["dev_id"], r["exclusive_blocks"], r["shared_blocks"]) for r in rows] == [
        (d.dev_id, *pool.device_usage(d)) for d in devices if not d.deleted]


@pytest.mark.parametrize("seed", range(12))
def test_model_memoised_walks_equal_brute_force(tmp_path, seed):
    """Random pools: snapshots of snapshots, CoW writes, remaps, discards, growth, removal."""
    rnd = random.Random(seed)
    path = new_pool(tmp_path, 6000)
    with Pool.open(path) as pool:
        pool.create_volume("v0", rnd.choice([3, 600, 1500]) * BS)
        for step in range(40):
            names = sorted(pool.names)
            op = rnd.random()
            name = rnd.choice(names)
            dev = pool.volume(name)
            nb = dev.size // BS
            if op < 0.2 and len(names) < 8:
                pool.snapshot(name, f"s{step}")
            elif op < 0.45:  # contiguous new mappings (runs), sometimes a whole leaf
                start = rnd.randrange(nb)
                n = min(nb - start, rnd.choice([1, 5, FANOUT, 2 * FANOUT]))
                pool._remap(dev, [(vb, pool.space.allocate()) for vb in range(start, start + n)])
            elif op < 0.6:  # real writes: copy-on-write of shared blocks
                for _ in range(rnd.randrange(1, 6)):
                    pool.write(dev.dev_id, rnd.randrange(nb) * BS, bytes([rnd.randrange(1, 256)]) * 100)
            elif op < 0.7:
                start = rnd.randrange(nb)
                pool.discard(dev.dev_id, start * BS, min(nb - start, rnd.randrange(1, 50)) * BS)
            elif op < 0.78:  # growth adds tree levels (Tree.grow): roots of different heights
                pool.resize(dev.dev_id, dev.size + rnd.choice([10, 600, 300_000]) * BS)
            elif op < 0.85 and len(names) > 1:
                pool.remove(name)
            elif op < 0.9:
                pool.commit()
            if step % 8 == 7:
                assert_matches_brute_force(pool)
        assert_matches_brute_force(pool)


def test_dump_xml_unchanged(tmp_path):
    """dump's XML from the memoised runs is the XML the brute-force runs give."""
    import io

    path = new_pool(tmp_path, 4000)
    with Pool.open(path) as pool:
        docker_chain(pool, 1200, 6)
        ir, _ = dump(pool)
        for d in ir.devices:
            d.runs = runs_of(pool.mappings(pool.device(d.dev_id)))
        want = io.StringIO()
        write_xml(ir, want)
        got = io.StringIO()
        write_xml(dump(pool)[0], got)
    assert got.getvalue() == want.getvalue()


def test_progress_is_told_per_device(tmp_path):
    path = new_pool(tmp_path, 4000)
    with Pool.open(path) as pool:
        docker_chain(pool, 600, 4)
        seen = []
        walks.usage(pool, pool.volumes(), progress=lambda done, total: seen.append((done, total)))
        assert seen == [(i, 5) for i in range(1, 6)]
        seen.clear()
        dump(pool, progress=lambda done, total: seen.append((done, total)))
        assert seen == [(i, 5) for i in range(1, 6)]


def test_work_is_proportional_to_distinct_nodes(tmp_path):
    """100,000 blocks x 100 snapshots: each distinct node is visited once per walk."""
    n, layers = 100_000, 100
    path = new_pool(tmp_path, n + 2 * layers + 100, metadata_size=64 * MiB)
    with Pool.open(path) as pool:
        devs = docker_chain(pool, n, layers)
        roots = [d.root for d in devs]
        unique = distinct_nodes(roots)
        brute = sum(tree_nodes(r) for r in roots)  # what walking every device visits
        assert brute > 50 * unique  # the shape shares nearly everything

        walk = walks.Walk(pool.space.counts)
        usage = walks.usage(pool, devs, walk=walk)
        assert walk.visits <= unique
        assert usage[devs[-1].dev_id] == pool.device_usage(devs[-1])

        walk = walks.Walk(pool.space.counts)
        runs = walks.device_runs(pool, devs, walk=walk)
        assert walk.visits <= unique
        assert runs[devs[50].dev_id] == runs_of(pool.mappings(devs[50]))

        # delta of two neighbouring layers: only the paths where they differ are compared;
        # the shared subtrees are taken whole (their mapped ranges, one visit per node)
        walk = walks.Walk(pool.space.counts)
        ranges = walk.delta(devs[-2].root, devs[-1].root)
        compared = walk.visits
        assert compared <= distinct_nodes([devs[-2].root, devs[-1].root])
        assert [r for r in ranges if r["kind"] != "same"] == [
            r for r in brute_delta([(v, d) for v, d, _ in pool.mappings(devs[-2])],
                                   [(v, d) for v, d, _ in pool.mappings(devs[-1])])
            if r["kind"] != "same"]
        # a second delta in the same walk reuses the shared subtrees' ranges: only the
        # differing paths are visited (at most one node per level on each side, twice)
        before = walk.visits
        walk.delta(devs[-3].root, devs[-2].root)
        assert walk.visits - before <= 4 * (devs[-1].root.level + 1)


def run_cli_with_stderr_on_a_terminal(*args) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); returns (status, stderr)."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "fusepool", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=slave, timeout=120)
        os.close(slave)
        slave = None
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    return proc.returncode, seen.decode()


def test_dump_shows_progress_on_a_terminal_only(tmp_path):
    from conftest import run_fusepool

    path = new_pool(tmp_path, 4000)
    with Pool.open(path) as pool:
        docker_chain(pool, 1200, 6)
    status, stderr = run_cli_with_stderr_on_a_terminal("dump", "-o", tmp_path / "tty.xml", path)
    assert status == 0
    assert "dump: " in stderr and "MiB written" in stderr and stderr.endswith("\n"), repr(stderr)
    piped = run_fusepool("dump", "-o", tmp_path / "pipe.xml", path)
    assert piped.stderr == ""  # not a terminal: nothing drawn
    assert (tmp_path / "tty.xml").read_bytes() == (tmp_path / "pipe.xml").read_bytes()
    assert run_fusepool("dump", path).stdout.encode() == (tmp_path / "pipe.xml").read_bytes()
