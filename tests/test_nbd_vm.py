"""A VM booted from a snapshot of a golden image served over NBD, as a CI job would do it.

The golden volume holds a small ext4 root filesystem (made with ``mkfs.ext4 -d``
and ``fusepool import``): a marker, a static busybox as /bin/sh and a job
script.  The test snapshots it, serves the pool with ``fusepool serve --nbd``
and runs ``tools/kernel-vm`` with ``--disk nbd+unix:///SNAP?socket=PATH``: qemu
is the NBD client, the guest's kernel mounts /dev/vda, runs the image's job in a
chroot, syncs and unmounts.  The daemon serves with ``--commit-period 3600`` and
is SIGKILLed after the VM: what the guest wrote is there only if the FLUSHes
qemu sent (for the guest's sync and umount, and when it closed the export) made
it durable.  Then the pool is served again, stopped with ``fusepool stop`` and
checked, and the snapshot and the golden volume are read offline: the snapshot
holds the job's files in a clean filesystem (e2fsck, debugfs), the golden
volume is byte-identical to the image it was made from.
"""

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time

from conftest import require, run_fusepool
from test_kernel_vm import kernel_vm, vm_run  # noqa: F401 (a fixture: pytest finds it here)
from test_nbd import make_served, sockdir  # noqa: F401 (fixtures)

MiB = 1 << 20
ARTIFACT = 6 * MiB

# The golden image's job, run by the guest in a chroot of the snapshot: busybox is the image's
# only program.  It reads the golden marker, writes an artifact and a result, and removes a
# file of the golden image (the snapshot changes, the golden volume must not).
CI_JOB = f"""#!/bin/sh
set -e
bb=/bin/busybox
$bb mkdir -p /var/ci
$bb head -c {ARTIFACT} /dev/urandom > /var/ci/artifact
$bb sha256sum /var/ci/artifact | $bb cut -d ' ' -f 1 > /var/ci/artifact.sha256
echo "ci-job ran on $($bb cat /etc/golden-marker) under kernel $($bb uname -r)" > /var/ci/result
$bb rm /etc/scratch
"""

GUEST = r"""
set -eu
echo "vda: $(cat /sys/block/vda/size) sectors"
echo "kernel: $(uname -r)"
mount -t ext4 /dev/vda /mnt
grep -qx "$MARKER" /mnt/etc/golden-marker
mount -t devtmpfs devtmpfs /mnt/dev
chroot /mnt /sbin/ci-job
umount /mnt/dev
echo "artifact: $(sha256sum /mnt/var/ci/artifact | cut -d ' ' -f 1)"
sync
umount /mnt
echo "unmounted"
"""


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def debugfs(image, request: str) -> subprocess.CompletedProcess:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, timeout=60)


def volumes(pool) -> dict:
    return {v["name"]: v for v in json.loads(run_fusepool("list", pool, "--json").stdout)}


def test_vm_boots_from_a_snapshot_served_over_nbd(kernel_vm, make_pool, make_served, tmp_path):  # noqa: F811 (the imported fixtures)
    require("mkfs.ext4", "e2fsck", "debugfs", "qemu-img")
    started = time.monotonic()
    # 1. the golden image: a tiny root filesystem, imported as a volume
    marker = f"golden-{secrets.token_hex(8)}"
    tree = tmp_path / "tree"
    for d in ("bin", "sbin", "etc", "dev", "mnt"):
        (tree / d).mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", tree / "bin" / "busybox")  # static (busybox-static)
    (tree / "bin" / "sh").symlink_to("busybox")
    (tree / "etc" / "golden-marker").write_text(marker + "\n")
    (tree / "etc" / "scratch").write_text("removed by the job\n")
    (tree / "sbin" / "ci-job").write_text(CI_JOB)
    (tree / "sbin" / "ci-job").chmod(0o755)
    golden_img = tmp_path / "golden.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "golden", "-d", tree, golden_img, "64M"],
                   check=True, capture_output=True)
    golden_sum = sha256(golden_img)
    pool = make_pool("pool")
    run_fusepool("import", pool, "golden", golden_img)
    run_fusepool("snapshot", pool, "golden", "job-1")
    before = volumes(pool)

    # 2. served over NBD; the VM boots with the snapshot as /dev/vda (qemu is the client)
    served = make_served(pool, "--commit-period", "3600")
    vm_started = time.monotonic()
    proc = vm_run(kernel_vm, tmp_path, GUEST, disks=[served.url("job-1")], timeout=600,
                  extra=["--env", f"MARKER={marker}", "-v"])
    vm_took = time.monotonic() - vm_started
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert lines["vda"] == f"{64 * MiB // 512} sectors", proc.stdout
    assert proc.stdout.splitlines()[-1] == "unmounted", proc.stdout

    # 3. only FLUSH made the guest's writes durable (no commit for an hour): kill the daemon
    served.kill()
    served = make_served(pool)
    # the golden volume, through NBD after the restart, is still the image it was made from
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", golden_img, served.url("golden")],
                   check=True, capture_output=True, timeout=120)
    served.stop()
    check = run_fusepool("check", pool)
    assert "clean" in check.stdout, check.stdout

    # 4. offline: the snapshot holds the job's files in a clean filesystem; golden is unchanged
    snap_img, golden_after = tmp_path / "job-1.img", tmp_path / "golden-after.img"
    run_fusepool("export", pool, "job-1", snap_img)
    run_fusepool("export", pool, "golden", golden_after)
    fsck = subprocess.run(["e2fsck", "-fn", snap_img], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    result = debugfs(snap_img, "cat /var/ci/result").stdout.decode()
    assert result == f"ci-job ran on {marker} under kernel {lines['kernel']}\n", result
    artifact = tmp_path / "artifact"
    debugfs(snap_img, f"dump /var/ci/artifact {artifact}")
    assert os.path.getsize(artifact) == ARTIFACT
    assert sha256(artifact) == lines["artifact"]
    assert debugfs(snap_img, "cat /var/ci/artifact.sha256").stdout.decode().strip() == lines["artifact"]
    assert b"File not found" in debugfs(snap_img, "stat /etc/scratch").stderr
    assert sha256(golden_after) == golden_sum
    assert debugfs(golden_after, "cat /etc/scratch").stdout == b"removed by the job\n"

    # the snapshot still shares the golden's untouched blocks; the golden volume kept its own
    after = volumes(pool)
    assert after["golden"]["mapped_blocks"] == before["golden"]["mapped_blocks"]
    assert after["job-1"]["shared_blocks"] > 0
    assert after["job-1"]["mapped_bytes"] >= before["job-1"]["mapped_bytes"] + ARTIFACT
    print(f"VM run {vm_took:.1f} s, whole test {time.monotonic() - started:.1f} s")

