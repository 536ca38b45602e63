"""Storage modes (loop | direct), autoextend and the low-water hook, through real mounts.

DESIGN.md "Pool" and "Space": loop mode keeps the data in a sparse file whose
available space the host caps; direct mode keeps it on a block device or a
preallocated file through O_DIRECT (no host page cache, space reserved).
Loop-mode pools can grow by themselves (LVM's thin_pool_autoextend_*), and
crossing the low-water mark runs a user hook once (what dmeventd does).
"""

import errno
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import check_blocks, fusepool_json, read_all, run_fusepool
from test_space import check_clean, wait_for, write_fully

from fusepool.engine import Pool, space

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB
META = ["--metadata-size", "16M", "--min-free-space", "0%"]


# --- helpers ------------------------------------------------------------------------------

def info(pool) -> dict:
    return fusepool_json("info", pool)


def create(pool, name: str, size: str = "1G") -> None:
    run_fusepool("create", pool, name, "--size", size)


def pool_log(pool) -> str:
    try:
        with open(os.path.join(pool, "fusepool.log")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def resident_bytes(path) -> int:
    """Bytes of ``path`` in the host page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def fp_error(*args, status) -> str:
    """Run a command that must fail: one error line on stderr, the given exit status."""
    proc = run_fusepool(*args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, (args, proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("fusepool: error: "), (args, proc.stderr)
    assert proc.stdout == "", (args, proc.stdout)
    return lines[0]


def check_extents(data_file, extents: list, expect: bytes) -> None:
    """Each mapped extent's bytes sit at data_block * BS of the data file or device."""
    assert extents
    for e in extents:
        data_file.seek(e["data_block"] * BS)
        got = data_file.read(e["length"])
        want = expect[e["offset"] : e["offset"] + e["length"]]
        assert got[: len(want)] == want, f"extent at {e['offset']}"
        assert not any(got[len(want) :]), f"the zero-filled tail of the extent at {e['offset']}"


class Appender(threading.Thread):
    """Appends random 1 MiB chunks to a volume until ``limit`` bytes or an error; keeps a model."""

    def __init__(self, path, seed: int, limit: int, fsync_every: int = 4):
        super().__init__(daemon=True)
        self.path, self.limit, self.fsync_every = path, limit, fsync_every
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.error: OSError | None = None

    def run(self):
        fd = os.open(self.path, os.O_RDWR)
        try:
            writes = 0
            while len(self.model) < self.limit:
                data = self.rng.randbytes(MiB)
                try:
                    done = os.pwrite(fd, data, len(self.model))
                    self.model += data[:done]
                    writes += 1
                    if writes % self.fsync_every == 0:
                        os.fsync(fd)
                except OSError as exc:
                    self.error = exc
                    return
            os.fsync(fd)
        finally:
            os.close(fd)


# --- bad input ------------------------------------------------------------------------------

def test_init_bad_input(tmp_path):
    """Each refusal is one line, a non-zero status, and leaves no pool directory behind."""
    plain = tmp_path / "plain-file"
    plain.write_bytes(b"x" * 4096)
    target = tmp_path / "new"
    cases = [
        (["--data-device", "/dev/fusepool-no-such-device"], 1, r"No such file"),
        (["--data-device", plain], 1, r"not a block device"),
        (["--data-device", plain, "--preallocate"], 2, r"exclude each other"),
        (["--mode", "loop", "--preallocate"], 2, r"need --mode direct"),
        (["--mode", "loop", "--data-device", plain], 2, r"need --mode direct"),
        (["--preallocate", "--autoextend-threshold", "80"], 2, r"loop mode only"),
        (["--mode", "direct", "--max-data-size", "1G"], 2, r"loop mode only"),
        (["--autoextend-threshold", "0"], 2, r"invalid autoextend threshold"),
        (["--autoextend-threshold", "101"], 2, r"invalid autoextend threshold"),
        (["--autoextend-threshold", "lots"], 2, r"invalid autoextend threshold"),
        (["--autoextend-percent", "0"], 2, r"invalid autoextend percent"),
        (["--autoextend-percent", "5000"], 2, r"invalid autoextend percent"),
        (["--autoextend-threshold", "80", "--max-data-size", "4M"], 2, r"below the pool's data size"),
        (["--max-data-size", "10X"], 2, r"invalid size"),
        (["--low-water-mark", "128"], 2, r"below the pool's 128 data blocks"),
        (["--low-water-mark", "-1"], 2, r"must not be negative"),
        (["--on-low-water", "true"], 2, r"needs a --low-water-mark"),
        (["--mode", "sideways"], 2, r"invalid choice"),
        # More than the host has: refused before anything is written.
        (["--preallocate", "--data-size", "1P", "--block-size", "1G"], 1, r"does not fit"),
    ]
    failures = []
    for extra, status, pattern in cases:
        args = ["init", target, "--data-size", "8M", *META, *map(str, extra)]
        if "--data-size" in map(str, extra):
            args = ["init", target, *META, *map(str, extra)]
        try:
            line = fp_error(*args, status=status)
            assert re.search(pattern, line), f"{line!r} does not match {pattern!r}"
            assert not target.exists(), "a refused init left the pool directory behind"
        except AssertionError as exc:
            failures.append(f"{extra}: {exc}")
    assert not failures, "\n".join(failures)
    # The directory existed before: it stays, empty.
    target.mkdir()
    fp_error("init", target, *META, "--preallocate", "--data-size", "1P", "--block-size", "1G", status=1)
    assert os.listdir(target) == []


def test_set_settings_and_bad_input(make_pool):
    """`fusepool set` changes autoextend/low-water settings; bad values change nothing."""
    loop = make_pool("loop", "--data-size", "8M", *META)
    direct = make_pool("direct", "--data-size", "8M", *META, "--preallocate")
    before = {p: (p / "pool.json").read_bytes() for p in (loop, direct)}
    fp_error("set", loop, status=2)
    fp_error("set", loop, "--autoextend-threshold", "150", status=2)
    fp_error("set", loop, "--autoextend-threshold", "80", "--max-data-size", "1M", status=2)
    fp_error("set", loop, "--on-low-water", "true", status=2)
    fp_error("set", loop, "--low-water-mark", "999", status=2)
    assert "loop mode only" in fp_error("set", direct, "--autoextend-threshold", "80", status=2)
    for p, content in before.items():
        assert (p / "pool.json").read_bytes() == content

    out = run_fusepool("set", loop, "--autoextend-threshold", "75", "--autoextend-percent", "30",
                       "--max-data-size", "64M", "--low-water-mark", "10", "--on-low-water", "true").stdout
    assert "at 75% used, grow by 30%" in out and "10 blocks" in out
    st = info(loop)
    assert (st["autoextend_threshold"], st["autoextend_percent"], st["max_data_size"]) == (75, 30, 64 * MiB)
    assert (st["low_water_mark"], st["on_low_water"]) == (10, "true")
    run_fusepool("set", loop, "--autoextend-threshold", "100", "--on-low-water", "", "--low-water-mark", "0")
    st = info(loop)
    assert (st["autoextend_threshold"], st["low_water_mark"], st["on_low_water"]) == (100, 0, None)
    text = run_fusepool("info", loop).stdout
    assert " Autoextend: off" in text and " Low Water Mark: off" in text
    run_fusepool("set", direct, "--low-water-mark", "5")  # the hook works in direct mode too
    assert info(direct)["low_water_mark"] == 5


# --- info: mode and Data Space Available ------------------------------------------------------

def test_info_mode_and_available_space(make_pool):
    """Docker's rule: loop mode caps the available space by the host's (Bfree); direct does not."""
    loop = make_pool("loop", "--data-size", "1T", "--min-free-space", "0%")  # far beyond the host
    st = info(loop)
    host = os.statvfs(loop)
    host_free = host.f_bfree * host.f_bsize
    assert st["mode"] == "loop" and st["data_space_total"] == 1 << 40
    assert st["data_space_available"] < st["data_space_total"]
    assert abs(st["data_space_available"] - host_free) < 256 * MiB, (st["data_space_available"], host_free)
    assert " Mode: loop" in run_fusepool("info", loop).stdout.splitlines()

    direct = make_pool("direct", "--data-size", "32M", *META, "--mode", "direct")
    st = info(direct)
    assert st["mode"] == "direct" and st["preallocated"] is True and st["data_device"] is None
    assert st["data_space_available"] == st["data_space_total"] - st["data_space_used"] == 32 * MiB
    assert os.stat(direct / "data").st_blocks * 512 >= 32 * MiB  # every byte allocated
    lines = run_fusepool("info", direct).stdout.splitlines()
    assert " Mode: direct" in lines and f" Data file: {direct / 'data'}" in lines


# --- autoextend -----------------------------------------------------------------------------

def test_autoextend_under_writers(make_pool, make_mount):
    """Two fio writers fill six times the initial 8 MiB: the pool grows, no write fails."""
    pool = make_pool("p", "--data-size", "8M", *META, "--autoextend-threshold", "80",
                     "--autoextend-percent", "50")
    m = make_mount(pool)
    for name in ("a", "b"):
        create(pool, name)
    jobs = []
    for name in ("a", "b"):
        jobs += [f"--name={name}", f"--filename={m.vol(name)}", "--rw=write", "--bs=1M", "--size=24M",
                 "--ioengine=psync", "--fsync=4", "--end_fsync=1", "--verify=crc32c", "--do_verify=1",
                 "--verify_state_save=0"]
    proc = subprocess.run(["fio", "--output-format=json", *jobs], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + pool_log(pool)[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    for job in report["jobs"]:
        assert job["error"] == 0, job["jobname"]
        assert job["write"]["io_bytes"] == 24 * MiB, job["write"]["io_bytes"]
    st = info(pool)
    assert st["data_space_used"] == 48 * MiB
    assert st["data_space_total"] >= 48 * MiB * 100 // 80 - 8 * MiB, st["data_space_total"]
    grown = re.findall(r"autoextend: pool .* data space .* -> (\S+ \S+)", pool_log(pool))
    assert len(grown) >= 3, grown
    assert "Data Space Total: " in run_fusepool("info", pool).stdout
    check_clean(pool)
    m.umount()
    check_clean(pool)
    assert info(pool)["data_space_total"] == st["data_space_total"]  # the growth was committed
    m.mount()
    verify = []
    for name in ("a", "b"):
        verify += [f"--name={name}", f"--filename={m.vol(name)}", "--rw=write", "--bs=1M", "--size=24M",
                   "--ioengine=psync", "--verify=crc32c", "--verify_only", "--verify_state_save=0"]
    proc = subprocess.run(["fio", *verify], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_autoextend_stops_at_max_data_size(make_pool, make_mount):
    """Grows up to --max-data-size, then the writer gets ENOSPC; the pool stays clean."""
    pool = make_pool("p", "--data-size", "8M", *META, "--autoextend-threshold", "80",
                     "--autoextend-percent", "50", "--max-data-size", "20M")
    # ENOSPC at write() itself once autoextend stops: --write-through (the default cache
    # reports it at fsync)
    m = make_mount(pool, "--write-through")
    create(pool, "v")
    writer = Appender(m.vol("v"), seed=1, limit=64 * MiB)
    writer.run()  # in this thread: it stops at the first error
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.ENOSPC, writer.error
    st = info(pool)
    assert st["data_space_total"] == 20 * MiB
    assert st["data_space_used"] == 20 * MiB and len(writer.model) == 20 * MiB
    assert "reached its maximum data size" in pool_log(pool)
    with pytest.raises(OSError) as exc:  # and again, at once
        write_fully(m.vol("v"), len(writer.model), b"x")
    assert exc.value.errno == errno.ENOSPC
    check_clean(pool)
    check_blocks(read_all(m.vol("v"), 0, len(writer.model)), writer.model, "v")
    m.umount()
    check_clean(pool)
    m.mount()
    check_blocks(read_all(m.vol("v"), 0, len(writer.model)), writer.model, "v")


def test_autoextend_rules_and_one_large_write(tmp_path):
    """The growth arithmetic; and a single write far larger than the free space (engine, no FUSE)."""
    assert space.trigger_blocks(100, 80) == 80 and space.trigger_blocks(3, 50) == 2
    assert space.target_blocks(100, 79, 80, 20, 10**9) == 100  # below the threshold
    assert space.target_blocks(100, 80, 80, 20, 10**9) == 120  # one step: 80 < 96
    assert space.target_blocks(100, 100, 80, 10, 10**9) == 134  # 110, 121, 134: under 80 %
    assert space.target_blocks(100, 100, 80, 20, 110) == 110  # capped
    assert space.target_blocks(100, 100, 80, 20, 90) == 100  # never shrinks
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=8 * MiB, metadata_size=4 * MiB, min_free_space=0,
                autoextend_threshold=80, autoextend_percent=25)
    data = random.Random(7).randbytes(40 * MiB)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 64 * MiB)
        assert pool.write(v.dev_id, 0, data) == len(data)  # grew several times on the way
        grown = pool.nr_blocks
        assert grown * BS >= 40 * MiB and not pool.dirty  # the growth was committed at once
    check_clean(path)
    with Pool.open(path) as pool:
        assert pool.nr_blocks == grown
        check_blocks(pool.read(pool.volume("v").dev_id, 0, len(data)), data, "v")


def test_queued_write_succeeds_once_autoextend_may_grow(make_pool, make_mount):
    """Queue mode: a write waiting on a full pool succeeds when `set` raises the maximum."""
    pool = make_pool("p", "--data-size", "8M", *META, "--autoextend-threshold", "80",
                     "--autoextend-percent", "50", "--max-data-size", "8M", "--no-space-timeout", "30")
    # a write() that waits for space (queue mode): --write-through (with the default cache
    # the kernel's writeback waits instead)
    m = make_mount(pool, "--write-through")
    create(pool, "v")
    writer = Appender(m.vol("v"), seed=2, limit=16 * MiB)
    writer.start()
    wait_for(lambda: "writes wait up to" in pool_log(pool), 20, "a write to queue for space")
    assert writer.is_alive()
    raised_at = time.monotonic()
    run_fusepool("set", pool, "--max-data-size", "64M")  # online, through the daemon
    writer.join(30)
    assert not writer.is_alive() and writer.error is None, writer.error
    assert time.monotonic() - raised_at < 10
    st = info(pool)
    assert st["max_data_size"] == 64 * MiB and 16 * MiB <= st["data_space_total"] <= 64 * MiB
    check_blocks(read_all(m.vol("v"), 0, len(writer.model)), writer.model, "v")
    check_clean(pool)


# --- the low-water hook ---------------------------------------------------------------------

def hook_lines(marker) -> list[dict]:
    if not os.path.exists(marker):
        return []
    with open(marker) as f:
        return [dict(kv.split("=", 1) for kv in line.split()) for line in f if line.strip()]


def test_low_water_hook_once_per_crossing(make_pool, make_mount, tmp_path):
    """The hook runs once when free blocks drop below the mark, again only after a new crossing."""
    marker = tmp_path / "marker"
    hook = (f'echo "free=$FUSEPOOL_FREE_BLOCKS total=$FUSEPOOL_TOTAL_BLOCKS pool=$FUSEPOOL_POOL '
            f'mark=$FUSEPOOL_LOW_WATER_MARK" >> {marker}; sleep 3; echo "done=1" >> {marker}.done')
    pool = make_pool("p", "--data-size", "16M", *META, "--low-water-mark", "64", "--on-low-water", hook)
    m = make_mount(pool)
    for name in ("a", "b"):
        create(pool, name)
    write_fully(m.vol("a"), 0, random.randbytes(12 * MiB))  # 192 of 256 blocks: 64 free, not below
    time.sleep(0.5)
    assert hook_lines(marker) == []
    t0 = time.monotonic()
    write_fully(m.vol("a"), 12 * MiB, random.randbytes(MiB))  # crosses the mark
    write_fully(m.vol("a"), 13 * MiB, random.randbytes(MiB))  # still below: no second run
    assert time.monotonic() - t0 < 2.5, "writes waited for the hook"
    wait_for(lambda: hook_lines(marker), 10, "the hook to run")
    (event,) = hook_lines(marker)
    assert 0 <= int(event["free"]) < 64 and event["total"] == "256" and event["mark"] == "64"
    assert event["pool"] == str(pool)
    assert not os.path.exists(f"{marker}.done")  # it was still running while we wrote
    wait_for(lambda: os.path.exists(f"{marker}.done"), 10, "the hook to finish")
    assert len(hook_lines(marker)) == 1

    # Freeing space (the removal commits) re-arms it; the next crossing runs it again.
    run_fusepool("remove", pool, "a")
    write_fully(m.vol("b"), 0, random.randbytes(12 * MiB))
    time.sleep(0.5)
    assert len(hook_lines(marker)) == 1
    write_fully(m.vol("b"), 12 * MiB, random.randbytes(2 * MiB))
    wait_for(lambda: len(hook_lines(marker)) == 2, 10, "the second crossing's hook")
    time.sleep(0.5)
    assert len(hook_lines(marker)) == 2
    assert pool_log(pool).count("below the low-water mark of 64") == 2
    check_clean(pool)


def test_queued_write_succeeds_once_the_hook_extends(make_pool, make_mount, tmp_path):
    """Queue mode + a hook that runs `fusepool extend` (through the daemon it was started by)."""
    marker = tmp_path / "marker"
    fusepool = f"{sys.executable} -m fusepool"
    hook = (f'echo "free=$FUSEPOOL_FREE_BLOCKS" >> {marker}; '
            f'{fusepool} extend "$FUSEPOOL_POOL" --data-size 64M')
    pool = make_pool("p", "--data-size", "8M", *META, "--no-space-timeout", "30", "--low-water-mark", "1",
                     "--on-low-water", hook)
    m = make_mount(pool)
    create(pool, "v")
    writer = Appender(m.vol("v"), seed=3, limit=24 * MiB)
    writer.run()
    assert writer.error is None, f"{writer.error!r}\n{pool_log(pool)[-3000:]}"
    assert hook_lines(marker) == [{"free": "0"}]
    assert "writes wait up to" in pool_log(pool)  # the pool really was full meanwhile
    st = info(pool)
    assert st["data_space_total"] == 64 * MiB and st["data_space_used"] == 24 * MiB
    check_blocks(read_all(m.vol("v"), 0, len(writer.model)), writer.model, "v")
    check_clean(pool)


# --- direct mode ------------------------------------------------------------------------------

def test_direct_preallocated_bypasses_page_cache(make_pool, make_mount):
    """--preallocate: the whole file is allocated; data written through the mount is not cached."""
    loop = make_pool("loop", "--data-size", "32M", *META)
    direct = make_pool("direct", "--data-size", "32M", *META, "--preallocate")
    data_file = direct / "data"
    assert data_file.stat().st_blocks * 512 >= 32 * MiB
    rng = random.Random(4)
    content = rng.randbytes(8 * MiB) + bytes(BS) + rng.randbytes(3 * MiB + 12345)
    for pool in (loop, direct):
        m = make_mount(pool, name=f"mnt-{pool.name}")
        create(pool, "v", "64M")
        write_fully(m.vol("v"), 0, content)
        write_fully(m.vol("v"), 5000, b"unaligned overwrite")  # read-modify-write of a sector
        expect = content[:5000] + b"unaligned overwrite" + content[5019:]
        assert read_all(m.vol("v"), 0, len(content)) == expect
        run_fusepool("umount", m.mountpoint)
        m.mount()
        check_blocks(read_all(m.vol("v"), 0, len(content)), expect, pool.name)
        if pool is loop:  # the contrast that makes the next check mean something
            assert resident_bytes(pool / "data") > MiB
        else:
            assert resident_bytes(data_file) == 0, "direct mode left data in the host page cache"
    # The blocks sit at their dm-thin offsets in the data file.
    extents = fusepool_json("map", direct, "v")
    with open(data_file, "rb") as f:
        check_extents(f, extents, expect)
    # Removing frees blocks in the pool, never space on the host (no hole punching).
    allocated = data_file.stat().st_blocks
    run_fusepool("remove", direct, "v")
    assert info(direct)["data_space_used"] == 0
    assert data_file.stat().st_blocks == allocated
    check_clean(direct)


@pytest.mark.parametrize("zeroing", [True, False])
def test_direct_engine_unaligned_io(tmp_path, zeroing):
    """The engine on O_DIRECT: unaligned pieces, multi-buffer reads and writes, reopen."""
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=32 * MiB, metadata_size=4 * MiB, preallocate=True, min_free_space=0,
                skip_block_zeroing=not zeroing)
    rng = random.Random(5)
    size = 12 * MiB
    model = bytearray(size)
    with Pool.open(path) as pool:
        assert pool.data.direct and not pool.data.can_punch
        v = pool.create_volume("v", size)
        big = rng.randbytes(9 * MiB + 777)  # larger than one aligned buffer
        assert pool.write(v.dev_id, 4097, big) == len(big)
        model[4097 : 4097 + len(big)] = big
        for i in range(300):
            offset = rng.randrange(size - 1)
            length = rng.randint(1, min(3 * BS, size - offset))
            data = bytes(length) if rng.random() < 0.1 else rng.randbytes(length)
            assert pool.write(v.dev_id, offset, data) == length
            model[offset : offset + length] = data
            if i % 40 == 0:
                pool.commit()
                o, n = rng.randrange(size), rng.randint(0, 300 * KiB)
                assert pool.read(v.dev_id, o, n) == bytes(model[o : o + n])
        check_blocks(pool.read(v.dev_id, 0, size), model, "v")
    with Pool.open(path) as pool:
        check_blocks(pool.read(pool.volume("v").dev_id, 0, size), model, "v after reopen")
    check_clean(path)


@pytest.fixture
def loop_device(tmp_path):
    """A 64 MiB loop device over a file (root only); detached at teardown."""
    if os.getuid() != 0:
        pytest.skip("loop devices need root")
    image = tmp_path / "device.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                         check=True).stdout.strip()
    mounted = []
    yield dev, mounted
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@pytest.mark.root
def test_direct_on_a_loop_device(loop_device, make_mount, tmp_path):
    """--data-device: refusals (signature, in use), then a pool on the device itself."""
    dev, mounted = loop_device
    pool = tmp_path / "pool"
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    assert "not empty (blkid finds TYPE=ext4)" in fp_error("init", pool, "--data-device", dev, *META,
                                                           status=1)
    assert not pool.exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", dev, str(elsewhere)], check=True)
    mounted.append(elsewhere)
    assert "in use" in fp_error("init", pool, "--data-device", dev, "--force", *META, status=1)
    assert not pool.exists()
    subprocess.run(["umount", str(elsewhere)], check=True)
    mounted.clear()
    assert "larger than the data device" in fp_error("init", pool, "--data-device", dev, "--force",
                                                     "--data-size", "1G", *META, status=2)
    run_fusepool("init", pool, "--data-device", dev, "--force", *META)
    assert "data" not in os.listdir(pool)  # the device is the data
    st = info(pool)
    assert (st["mode"], st["data_device"], st["data_file"]) == ("direct", dev, dev)
    assert st["data_space_total"] == st["data_space_available"] == 64 * MiB

    m = make_mount(pool)
    create(pool, "v", "32M")
    content = random.Random(6).randbytes(5 * MiB + 3000)
    write_fully(m.vol("v"), BS, content)
    expect = bytes(BS) + content
    assert read_all(m.vol("v"), 0, len(expect)) == expect
    # While the pool uses the device nobody can mount it.
    proc = subprocess.run(["mount", dev, str(elsewhere)], capture_output=True, text=True)
    assert proc.returncode != 0
    m.umount()
    check_clean(pool)
    with open(dev, "rb") as f:  # the blocks are on the device at their dm-thin offsets
        check_extents(f, fusepool_json("map", pool, "v"), expect)
    m.mount()
    check_blocks(read_all(m.vol("v"), 0, len(expect)), expect, "v")
    fp_error("extend", pool, "--data-size", "128M", status=1)  # the device holds no more
    assert info(pool)["data_space_total"] == 64 * MiB


@pytest.mark.root
def test_preallocated_pool_on_a_small_host(small_hostfs):
    """Preallocating more than the host has: one line, nothing left; extend the same."""
    pool = small_hostfs / "pool"
    line = fp_error("init", pool, "--preallocate", "--data-size", "32M", "--metadata-size", "4M",
                    status=1)
    assert "does not fit" in line and not pool.exists()
    run_fusepool("init", pool, "--preallocate", "--data-size", "8M", "--metadata-size", "4M")
    before = info(pool)
    assert "no room to preallocate" in fp_error("extend", pool, "--data-size", "64M", status=1)
    assert os.path.getsize(pool / "data") == 8 * MiB
    after = info(pool)
    assert after["data_space_total"] == 8 * MiB and after["transaction_id"] == before["transaction_id"]
    run_fusepool("extend", pool, "--data-size", "12M")  # what fits, fits
    assert info(pool)["data_space_total"] == 12 * MiB
    assert (pool / "data").stat().st_blocks * 512 >= 12 * MiB
    check_clean(pool)
