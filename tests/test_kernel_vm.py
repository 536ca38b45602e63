"""fusepool's pools and vagrant/'s provisioning in the real kernel dm-thin target, in a qemu VM.

This machine's kernel has no device-mapper, so ``tools/kernel-vm`` boots
Debian's kernel under qemu (TCG unless KVM really works) with the disk images
attached as /dev/vda, /dev/vdb, ... and runs a shell script there.  The pool
test builds a pool through the CLI and a mount, moves it to the kernel
(``fusepool dump`` -> ``thin_restore`` -> ``dmsetup create``), compares every
thin device with what the mount served, lets the kernel write, discard and
break a snapshot share, and brings the result back with ``fusepool restore``.
The provisioning test runs vagrant/'s scripts unchanged in one VM: Docker's
direct-lvm and loop-lvm pools are built, written, re-activated, read back,
autoextended by LVM's policy, torn down and built again.

Nothing is skipped: tools/setup installs qemu and the kernel, and a missing
package fails the tests with the line ``tools/kernel-vm check`` prints.
"""

import json
import os
import random
import subprocess
import sys
import time
from math import ceil
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import check_blocks, read_all, run_fusepool, write_fully

ROOT = Path(__file__).resolve().parent.parent
KERNEL_VM = ROOT / "tools" / "kernel-vm"
KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB


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
    tree = tmp_path / "tree"  # for --copy: a directory with a script, a symlink, a subdirectory
    (tree / "sub").mkdir(parents=True)
    (tree / "run.sh").write_text("echo copied script ran\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "sub" / "data").write_bytes(b"\x00\xffdata")
    (tree / "link").symlink_to("sub/data")
    single = tmp_path / "single.txt"
    single.write_text("one file\n")
    out = tmp_path / "out"
    proc = vm_run(kernel_vm, tmp_path, r"""
echo "to stdout"
echo "to stderr" >&2
echo "udev: $DM_DISABLE_UDEV greeting: $GREETING"
/deep/dir/tree/run.sh
cmp /deep/dir/tree/link /deep/dir/tree/sub/data && cat /files/single.txt
head -c 15 /dev/vda
if echo x | dd of=/dev/vda conv=fsync status=none 2>/dev/null; then echo "vda is writable"; fi
echo "written by the guest" | dd of=/dev/vdb bs=512 seek=1 conv=fsync status=none
mkdir -p /out/sub
printf 'one\n' > /out/one.txt
ln -s one.txt /out/link
head -c 100000 /dev/zero | tr '\0' 'z' > /out/sub/big
readlink /proc/$$/exe
exit 7
""", disks=[f"{ro}:ro", rw], out=out, expect_status=7,
                  extra=["--env", "GREETING=hello world",
                         "--copy", f"{tree}:/deep/dir/tree", "--copy", single])
    assert proc.stdout.splitlines() == ["to stdout", "udev: 1 greeting: hello world", "copied script ran",
                                        "one file", "read-only disk", "/usr/bin/dash"], proc.stdout
    assert "to stderr" in proc.stderr
    assert (out / "one.txt").read_text() == "one\n"
    assert os.readlink(out / "link") == "one.txt"
    assert (out / "sub" / "big").read_bytes() == b"z" * 100000
    assert ro.read_bytes()[:15] == b"read-only disk\n"
    with open(rw, "rb") as f:
        f.seek(512)
        assert f.read(21) == b"written by the guest\n"


@pytest.mark.parametrize("spec, error", [
    ("/no/such/file", "no such file or directory /no/such/file"),
    (".:/usr/local/x", "cannot copy to /usr/local/x"),
    (".:/tmp", "cannot copy to /tmp"),
    (".:/", "cannot copy to /"),
])
def test_bad_copy_is_refused_before_booting(kernel_vm, tmp_path, spec, error):
    script = tmp_path / "s.sh"
    script.write_text("exit 0\n")
    proc = subprocess.run([*kernel_vm, "run", "--script", str(script), "--copy", spec],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("kernel-vm: --copy ") and error in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("url, error", [
    ("nbd+unix:///v?socket={tmp}/no.sock", "no unix socket at {tmp}/no.sock (is the NBD server running?)"),
    ("nbd+unix:///v?socket={tmp}/file:ro", "no unix socket at {tmp}/file (is the NBD server running?)"),
    ("nbd+unix:///v", "expected nbd+unix:///NAME?socket=PATH"),
    ("nbd:///v", "expected nbd://HOST[:PORT]/NAME"),
    ("nbd://localhost:port/v", "bad port"),
])
def test_bad_nbd_disk_is_refused_before_booting(kernel_vm, tmp_path, url, error):
    (tmp_path / "file").write_text("not a socket\n")
    script = tmp_path / "s.sh"
    script.write_text("exit 0\n")
    url, error = url.format(tmp=tmp_path), error.format(tmp=tmp_path)
    proc = subprocess.run([*kernel_vm, "run", "--script", str(script), "--disk", url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"kernel-vm: --disk {url.removesuffix(':ro')}: {error}\n", proc.stderr


def test_timeout_kills_the_vm(kernel_vm, tmp_path):
    started = time.monotonic()
    proc = vm_run(kernel_vm, tmp_path, "sleep 1000\n", timeout=5, expect_status=124)
    assert time.monotonic() - started < 60
    assert "timed out" in proc.stderr


# --- a fusepool pool in the kernel and back ---------------------------------------------------

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
        write_fully(m.vol(name), offset, data)
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

    served = {name: read_all(m.vol(name)) for name in model}
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
        check_blocks(read_all(m2.vol(name)), bytes(expected[name]), f"restored {name}")
    m2.umount()


# --- vagrant/'s provisioning scripts, unchanged, in the VM ------------------------------------

# What the Vagrant box runs (vagrant/Vagrantfile), with the VM's disks and small sizes: vda is
# direct-lvm's disk, vdb the filesystem for loop-lvm's files, vdc a disk for vgextend.
PROVISION_ENV = {
    "DIRECT_LVM_DISK": "/dev/vda", "BENCH_DISK": "/dev/vdb", "THIN_VOLUME_SIZE": "1G",
    "LOOP_LVM_DATA_SIZE": "256M", "LOOP_LVM_METADATA_SIZE": "16M",
}
EXTENT = 4 * MiB  # LVM's default extent size
PATTERN_AT = 3 * MiB  # the pattern's offset in both thin volumes: 512 KiB blocks 6 and 7

PROVISION_SCRIPT = r"""
set -eu
v=/fusepool/vagrant
setup() { $v/bench-fs.sh && $v/direct-lvm.sh && $v/loop-lvm.sh; }
teardown() { $v/loop-lvm-teardown.sh && $v/direct-lvm-teardown.sh && $v/bench-fs-teardown.sh; }
leftovers() {  # everything the scripts could leave behind
    echo "dm: $(dmsetup ls | grep -v 'No devices found' | tr '\n' ' ')"
    echo "loop: $(losetup -n -O NAME,BACK-FILE | tr '\n' ' ')"
    echo "pvs: $(pvs --noheadings -o pv_name | tr -d ' \n')"
    for d in /dev/vda /dev/vdb /dev/vdc; do echo "$d: $(blkid -p -o export $d | tr '\n' ' ')"; done
    echo "mounts: $(grep -c fusepool-bench /proc/mounts)"
    echo "fstab: $(grep -c fusepool-bench /etc/fstab)"
    echo "profile: $(ls /etc/lvm/profile | grep -c docker-thinpool)"
    echo "dir: $(ls -d /srv/fusepool-bench 2>/dev/null | wc -l)"
}
lvs_json() { lvs -a --reportformat json --binary --units b --nosuffix \
    -o lv_name,lv_size,chunk_size,zero,profile,data_percent "$@"; }

refused() {  # a run that must fail: its stderr
    if "$@" > /dev/null 2>> /out/refused.txt; then echo "not refused: $*" >&2; exit 1; fi
}

setup
lvs_json docker > /out/lvs.json
dmsetup table > /out/table.txt
# a disk in use, or a bad size, stops a script before it changes anything
DIRECT_LVM_VG=other DIRECT_LVM_DISK=/dev/vda refused $v/direct-lvm.sh
DIRECT_LVM_VG=other DIRECT_LVM_DISK=/dev/vdb refused $v/direct-lvm.sh
BENCH_DIR=/srv/other BENCH_DISK=/dev/vda refused $v/bench-fs.sh
LOOP_LVM_POOL=other THIN_VOLUME_SIZE=lots refused $v/loop-lvm.sh

# Written through the thin volumes, read back after a deactivation and a second run of the
# scripts (which re-activates direct-lvm and re-attaches loop-lvm's files, as after a reboot).
for dev in /dev/docker/bench /dev/mapper/loop-lvm-bench; do
    dd if=/files/pattern of=$dev bs=64K seek=$((PATTERN_AT / 65536)) oflag=direct conv=fsync status=none
done
dmsetup status > /out/status-written.txt
vgchange -an docker
dmsetup remove loop-lvm-bench
dmsetup remove loop-lvm-pool
losetup -D
setup > /out/second-run.txt
dd if=/dev/docker/bench of=/out/direct.img bs=1M count=8 iflag=direct status=none
dd if=/dev/mapper/loop-lvm-bench of=/out/loop.img bs=1M count=8 iflag=direct status=none

# The autoextend profile at work: past 80% full, LVM's policy (what dmeventd runs) grows the
# pool by 20%, but only once the volume group has room for it.  Provisioning 4 KiB every
# 512 KiB fills the pool with little I/O (no zeroing).
pool=$(lvs --noheadings --units b --nosuffix -o lv_size docker/thinpool | tr -d ' ')
fio --name=fill --filename=/dev/docker/bench --rw=write:508k --bs=4k --direct=1 \
    --offset=16M --size=$((pool * 85 / 100)) > /dev/null
lvs_json docker/thinpool > /out/lvs-full.json
if lvextend --use-policies docker/thinpool 2> /out/autoextend-1.txt; then echo 0; else echo $?; fi \
    > /out/autoextend-1.status
pvcreate -q /dev/vdc
vgextend -q docker /dev/vdc
lvextend --use-policies docker/thinpool 2>&1
lvs_json docker/thinpool > /out/lvs-extended.json

teardown
leftovers > /out/leftovers.txt
"""


def test_vagrant_provisioning_builds_kernel_thin_pools(kernel_vm, tmp_path):
    """vagrant/'s scripts, unchanged, build Docker's direct-lvm and loop-lvm pools in the kernel
    (512 KiB blocks, no zeroing, the autoextend profile), whose thin volumes keep what is written,
    and their teardown leaves nothing, so they run again."""
    disks = []
    for name, size in (("direct-lvm", 512 * MiB), ("bench-fs", 1024 * MiB), ("extra-pv", 512 * MiB)):
        disks.append(tmp_path / f"{name}.img")
        with open(disks[-1], "wb") as f:
            f.truncate(size)
    pattern = tmp_path / "pattern"
    pattern.write_bytes(random.Random(6).randbytes(1 * MiB))
    env = [f"--env={k}={v}" for k, v in {**PROVISION_ENV, "PATTERN_AT": PATTERN_AT}.items()]
    out = tmp_path / "out"
    started = time.monotonic()
    proc = vm_run(kernel_vm, tmp_path, PROVISION_SCRIPT, disks=disks, out=out, timeout=300,
                  extra=[*env, "--copy", f"{ROOT / 'vagrant'}:/fusepool/vagrant", "--copy", pattern])
    print(f"VM run: {time.monotonic() - started:.1f} s")
    # Docker's commands, as the scripts print them
    for command in ("+ lvconvert -y --zero n -c 512K --thinpool docker/thinpool --poolmetadata "
                    "docker/thinpoolmeta", "+ lvchange --metadataprofile docker-thinpool docker/thinpool",
                    "+ dmsetup message loop-lvm-pool 0 create_thin 0"):
        assert command in proc.stdout, proc.stdout

    # 1. direct-lvm: 95% / 1% of the VG, 512 KiB chunks, zeroing off, the profile attached
    lvs = {lv["lv_name"]: lv for lv in json.loads((out / "lvs.json").read_text())["report"][0]["lv"]}
    assert set(lvs) == {"thinpool", "[thinpool_tdata]", "[thinpool_tmeta]", "[lvol0_pmspare]", "bench"}
    pool = lvs["thinpool"]
    assert (int(pool["chunk_size"]), pool["zero"], pool["lv_profile"]) == (512 * KiB, "0", "docker-thinpool")
    vg_extents = (512 * MiB - 1 * MiB) // EXTENT  # the PV's label and metadata take the first MiB
    pool_extents = int(pool["lv_size"]) // EXTENT
    assert pool_extents == vg_extents * 95 // 100  # LVM rounds percentages down
    assert int(lvs["[thinpool_tmeta]"]["lv_size"]) == vg_extents // 100 * EXTENT
    assert int(lvs["bench"]["lv_size"]) == 1 << 30
    table = dict(line.split(": ", 1) for line in (out / "table.txt").read_text().splitlines())
    direct = table["docker-thinpool-tpool"].split()
    assert direct[2] == "thin-pool" and direct[5] == "1024" and direct[-1] == "skip_block_zeroing", direct
    # 2. loop-lvm: loop devices, 512 KiB blocks, Docker's low-water mark, zeroing off, thin id 0
    loop = table["loop-lvm-pool"].split()
    assert loop[2] == "thin-pool" and loop[5:] == ["1024", "32768", "1", "skip_block_zeroing"], loop
    assert all(dev.startswith("7:") for dev in loop[3:5]), loop  # major 7: loop devices
    assert int(loop[1]) == 256 * MiB // 512
    thin = table["loop-lvm-bench"].split()
    assert (thin[1], thin[2], thin[4]) == (str((1 << 30) // 512), "thin", "0"), thin

    assert (out / "refused.txt").read_text().splitlines() == [
        "direct-lvm.sh: /dev/vda is not empty (TYPE=LVM2_member): not touching it; "
        "if it is really free, wipefs -a /dev/vda",
        "direct-lvm.sh: /dev/vdb is mounted: not touching it",
        "bench-fs.sh: /dev/vda is not empty (TYPE=LVM2_member): not touching it; "
        "if it is really free, wipefs -a /dev/vda",
        "loop-lvm.sh: bad size 'lots' (e.g. 512M, 10G)"]

    # 3. both thin volumes kept the pattern across a deactivation (zeros around it), and each
    # pool provisioned exactly the two 512 KiB blocks it covers
    expected = bytearray(8 * MiB)
    expected[PATTERN_AT:PATTERN_AT + MiB] = pattern.read_bytes()
    for name in ("direct", "loop"):
        check_blocks((out / f"{name}.img").read_bytes(), bytes(expected), f"{name}-lvm volume", 512 * KiB)
    status = dict(line.split(": ", 1) for line in (out / "status-written.txt").read_text().splitlines())
    for dm_name in ("docker-thinpool-tpool", "loop-lvm-pool"):
        assert status[dm_name].split()[5].split("/")[0] == "2", status[dm_name]
    second = (out / "second-run.txt").read_text()
    assert "keeping it" in second and "re-attaching" in second, second

    # 4. autoextend: the policy grows the pool by 20% only once the VG has room (Docker's recipe
    # leaves ~4% of a single disk free)
    full = json.loads((out / "lvs-full.json").read_text())["report"][0]["lv"][0]
    extended = json.loads((out / "lvs-extended.json").read_text())["report"][0]["lv"][0]
    assert float(full["data_percent"]) > 80
    assert (out / "autoextend-1.status").read_text().strip() != "0"
    assert "Insufficient free space" in (out / "autoextend-1.txt").read_text()
    assert int(extended["lv_size"]) == (pool_extents + ceil(pool_extents * 20 / 100)) * EXTENT
    assert float(extended["data_percent"]) < 80

    # 5. teardown leaves nothing: no device-mapper or loop device, no LVM label or filesystem
    # on any disk (so the scripts' empty-disk check passes again), no mount, fstab line, profile
    leftovers = (out / "leftovers.txt").read_text().splitlines()
    assert leftovers == ["dm: ", "loop: ", "pvs: ", "/dev/vda: ", "/dev/vdb: ", "/dev/vdc: ",
                         "mounts: 0", "fstab: 0", "profile: 0", "dir: 0"], leftovers
