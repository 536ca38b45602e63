"""fusepool's pools in the real kernel dm-thin target, inside a throw-away qemu VM.

This machine's kernel has no device-mapper, so ``tools/kernel-vm`` boots
Debian's kernel under qemu (TCG unless KVM really works) with the disk images
attached as /dev/vda, /dev/vdb, ... and runs a shell script there.  The pool
test builds a pool through the CLI and a mount, moves it to the kernel
(``fusepool dump`` -> ``thin_restore`` -> ``dmsetup create``), compares every
thin device with what the mount served, lets the kernel write, discard and
break a snapshot share, and brings the result back with ``fusepool restore``.

Skipped only when qemu-system-x86_64 or a kernel image with dm-thin modules
(linux-image-amd64) is missing; anything else missing fails with the line
``tools/kernel-vm check`` prints.
"""

import glob
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import have, run_fusepool

ROOT = Path(__file__).resolve().parent.parent
KERNEL_VM = ROOT / "tools" / "kernel-vm"
KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB


def kernel_installed() -> bool:
    return any(glob.glob(f"/lib/modules/{os.path.basename(p)[len('vmlinuz-'):]}"
                         "/kernel/drivers/md/dm-thin-pool.ko*") for p in glob.glob("/boot/vmlinuz-*"))


pytestmark = [
    pytest.mark.skipif(not have("qemu-system-x86_64"),
                       reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"),
    pytest.mark.skipif(not kernel_installed(),
                       reason="no kernel with dm-thin modules (apt-get install linux-image-amd64)"),
]


@pytest.fixture(scope="module")
def kernel_vm():
    """tools/kernel-vm, checked and its initramfs built (once, cached across runs)."""
    tool = [sys.executable, str(KERNEL_VM)]  # stdlib only: any Python 3.10+ runs it
    check = subprocess.run([*tool, "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    build = subprocess.run([*tool, "build"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    return tool


def vm_run(kernel_vm, tmp_path, script: str, disks=(), out=None, timeout=240, extra=(),
           expect_status=0) -> subprocess.CompletedProcess:
    path = tmp_path / f"script-{time.monotonic_ns()}.sh"
    path.write_text(script)
    cmd = [*kernel_vm, "run", "--script", path, "--timeout", str(timeout), *extra]
    for d in disks:
        cmd += ["--disk", d]
    if out is not None:
        cmd += ["--out", out]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout + 120)
    if expect_status is not None:
        assert proc.returncode == expect_status, (
            f"kernel-vm exited {proc.returncode}, expected {expect_status}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# --- the tool itself ----------------------------------------------------------------------

def test_run_passes_output_status_disks_and_files_back(kernel_vm, tmp_path):
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"read-only disk\n".ljust(1 * MiB, b"\0"))
    rw = tmp_path / "rw.img"
    with open(rw, "wb") as f:
        f.truncate(4 * MiB)
    out = tmp_path / "out"
    proc = vm_run(kernel_vm, tmp_path, r"""
echo "to stdout"
echo "to stderr" >&2
echo "udev: $DM_DISABLE_UDEV greeting: $GREETING"
head -c 15 /dev/vda
if echo x | dd of=/dev/vda conv=fsync status=none 2>/dev/null; then echo "vda is writable"; fi
echo "written by the guest" | dd of=/dev/vdb bs=512 seek=1 conv=fsync status=none
mkdir -p /out/sub
printf 'one\n' > /out/one.txt
ln -s one.txt /out/link
head -c 100000 /dev/zero | tr '\0' 'z' > /out/sub/big
readlink /proc/$$/exe
exit 7
""", disks=[f"{ro}:ro", rw], out=out, extra=["--env", "GREETING=hello world"], expect_status=7)
    assert proc.stdout.splitlines() == ["to stdout", "udev: 1 greeting: hello world",
                                        "read-only disk", "/usr/bin/dash"], proc.stdout
    assert "to stderr" in proc.stderr
    assert (out / "one.txt").read_text() == "one\n"
    assert os.readlink(out / "link") == "one.txt"
    assert (out / "sub" / "big").read_bytes() == b"z" * 100000
    assert ro.read_bytes()[:15] == b"read-only disk\n"
    with open(rw, "rb") as f:
        f.seek(512)
        assert f.read(21) == b"written by the guest\n"


def test_timeout_kills_the_vm(kernel_vm, tmp_path):
    started = time.monotonic()
    proc = vm_run(kernel_vm, tmp_path, "sleep 1000\n", timeout=5, expect_status=124)
    assert time.monotonic() - started < 60
    assert "timed out" in proc.stderr


# --- a fusepool pool in the kernel and back ---------------------------------------------------

def read_file(path) -> bytes:
    """Read through the mount, the file's page cache dropped first (what the daemon serves)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size, parts, pos = os.fstat(fd).st_size, [], 0
        while pos < size:
            chunk = os.pread(fd, min(size - pos, 4 * MiB), pos)
            assert chunk, f"{path}: short read at {pos}"
            parts.append(chunk)
            pos += len(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def pwrite_all(path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        os.fsync(fd)
    finally:
        os.close(fd)


def check_blocks(actual: bytes, expected: bytes, what: str) -> None:
    """Equal, or an assertion naming the first differing block."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} bytes, expected {len(expected)}"
    if actual != expected:
        for b in range(0, len(expected), BS):
            if actual[b:b + BS] != expected[b:b + BS]:
                raise AssertionError(f"{what}: block {b // BS} differs: {actual[b:b + 32]!r}... "
                                     f"expected {expected[b:b + 32]!r}...")


def kernel_block(n: int) -> bytes:
    """What the guest writes: ``yes KERNEL-WROTE-THIS | head -c n``."""
    line = b"KERNEL-WROTE-THIS\n"
    return (line * (n // len(line) + 1))[:n]


def mappings(xml_text: str) -> dict:
    """{dev_id: {virtual block: data block}} from thin_dump XML."""
    result = {}
    for dev in ElementTree.fromstring(xml_text):
        maps = result.setdefault(int(dev.get("dev_id")), {})
        for m in dev:
            if m.tag == "range_mapping":
                for i in range(int(m.get("length"))):
                    maps[int(m.get("origin_begin")) + i] = int(m.get("data_begin")) + i
            else:
                maps[int(m.get("origin_block"))] = int(m.get("data_block"))
    return result


def test_fusepool_pool_activates_in_the_kernel(kernel_vm, make_pool, make_mount, tmp_path):
    pool = make_pool("pool", "--data-size", "128M", "--metadata-size", "16M")
    m = make_mount(pool)
    rng = random.Random(20240611)
    model: dict[str, bytearray] = {}

    def create(name, size):
        run_fusepool("create", pool, name, "--size", size)
        model[name] = bytearray(size)

    def put(name, offset, data):
        pwrite_all(m.vol(name), offset, data)
        model[name][offset:offset + len(data)] = data

    def snapshot(origin, name):
        run_fusepool("snapshot", pool, origin, name)
        model[name] = bytearray(model[origin])

    create("a", 32 * MiB)
    for b in range(0, 160):
        if b % 7 != 3:
            put("a", b * BS, rng.randbytes(BS))
    put("a", 200 * BS + 1000, rng.randbytes(3000))  # a partial write into a hole
    create("b", 16 * MiB)  # unrelated to the rest
    put("b", 300_000, rng.randbytes(5 * MiB))
    create("odd", 3 * MiB + 4 * KiB)  # not a whole number of blocks
    put("odd", 3 * MiB + 4 * KiB - 5000, rng.randbytes(5000))
    snapshot("a", "s")
    put("a", 11 * BS + 100, rng.randbytes(200))  # CoW of a shared block, origin side
    put("s", 20 * BS, rng.randbytes(BS))  # a whole shared block replaced, snapshot side
    snapshot("s", "ss")  # a snapshot of the snapshot, then both diverge
    put("ss", 30 * BS - 50, rng.randbytes(100))
    put("s", 40 * BS + 7, rng.randbytes(70_000))
    run_fusepool("discard", pool, "ss", str(50 * BS), str(4 * BS))  # ss's blocks 50..53
    model["ss"][50 * BS:54 * BS] = bytes(4 * BS)
    run_fusepool("discard", pool, "a", str(100 * BS), str(2 * BS))
    model["a"][100 * BS:102 * BS] = bytes(2 * BS)

    served = {name: read_file(m.vol(name)) for name in model}
    for name in model:  # the pool is what we think it is
        check_blocks(served[name], bytes(model[name]), f"mount {name}")
    m.umount()

    xml, names_file = tmp_path / "x.xml", tmp_path / "n.json"
    run_fusepool("dump", pool, "-o", xml, "--names", names_file)
    sb = ElementTree.parse(xml).getroot()
    bs_sectors, nr_blocks = int(sb.get("data_block_size")), int(sb.get("nr_data_blocks"))
    assert bs_sectors * 512 == BS
    names = {v["name"]: (int(dev_id), v["size"]) for dev_id, v in json.loads(names_file.read_text()).items()}
    assert set(names) == set(model)
    meta = tmp_path / "meta.img"
    with open(meta, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["thin_restore", "-i", xml, "-o", meta], check=True, capture_output=True)
    data = tmp_path / "data.img"  # the pool's data device: a copy (the VM writes to it)
    subprocess.run(["cp", "--sparse=always", pool / "data", data], check=True)
    assert os.path.getsize(data) == nr_blocks * BS

    # In the guest: vda = the data copy, vdb = the metadata.  The kernel reads every device,
    # then overwrites a block a shares with s (the share must break), writes 4 KiB into an
    # unmapped block of a (provisioned, the rest zeroed), writes into ss and discards in b.
    blk = f"0 {nr_blocks * bs_sectors} thin-pool /dev/vdb /dev/vda {bs_sectors} 0"
    lines = ["set -e", f'dmsetup create pool --table "{blk}"']
    for name, (dev_id, size) in sorted(names.items()):
        lines.append(f'dmsetup create {name} --table "0 {-(-size // 512)} thin /dev/mapper/pool {dev_id}"')
    for name in sorted(names):
        lines.append(f"dd if=/dev/mapper/{name} of=/out/{name}.img bs=1M status=none")
    lines += [
        "yes KERNEL-WROTE-THIS | head -c 65536 > /tmp/blk",
        f"dd if=/tmp/blk of=/dev/mapper/a bs={BS} seek=5 conv=fsync status=none",
        f"dd if=/tmp/blk of=/dev/mapper/a bs=4096 count=1 seek={300 * BS // 4096 + 3} conv=fsync status=none",
        f"dd if=/tmp/blk of=/dev/mapper/ss bs={BS} seek=60 conv=fsync status=none",
        f"blkdiscard -o {2 * MiB} -l {BS * 3} /dev/mapper/b",
        "dmsetup status",
        *[f"dmsetup remove {name}" for name in sorted(names)],
        "dmsetup remove pool",
        "thin_check /dev/vdb",
        "thin_dump /dev/vdb > /out/after.xml",
    ]
    out = tmp_path / "out"
    started = time.monotonic()
    vm_run(kernel_vm, tmp_path, "\n".join(lines) + "\n", disks=[data, meta], out=out)
    print(f"VM run: {time.monotonic() - started:.1f} s")

    # 1. every thin device read in the kernel is byte-identical to what the mount served
    for name in names:
        check_blocks((out / f"{name}.img").read_bytes(), served[name], f"kernel {name}")

    # 2. the kernel's writes and discard, in its own metadata
    before, after = mappings(xml.read_text()), mappings((out / "after.xml").read_text())
    a, s, ss, b = (names[n][0] for n in ("a", "s", "ss", "b"))
    assert before[a][5] == before[s][5] and after[a][5] != after[s][5] == before[s][5]
    assert 300 not in before[a] and 300 in after[a]
    assert before[ss][60] == before[s][60] and after[ss][60] != after[s][60] == before[s][60]
    assert all(vb in before[b] and vb not in after[b] for vb in (32, 33, 34))

    # 3. back into fusepool: the modified data image and the kernel's metadata
    expected = {name: bytearray(content) for name, content in served.items()}
    expected["a"][5 * BS:6 * BS] = kernel_block(BS)
    expected["a"][300 * BS:301 * BS] = bytes(BS)
    expected["a"][300 * BS + 3 * 4096:300 * BS + 4 * 4096] = kernel_block(4096)
    expected["ss"][60 * BS:61 * BS] = kernel_block(BS)
    expected["b"][2 * MiB:2 * MiB + 3 * BS] = bytes(3 * BS)
    back = tmp_path / "back"
    run_fusepool("restore", back, "-i", out / "after.xml", "--data", data, "--names", names_file)
    run_fusepool("check", back)
    m2 = make_mount(back)
    for name in names:
        check_blocks(read_file(m2.vol(name)), bytes(expected[name]), f"restored {name}")
    m2.umount()
