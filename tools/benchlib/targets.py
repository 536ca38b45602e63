"""What the benchmarks run on, and the daemons behind it.

- mounts: a fusepool mount (``FusepoolMount``), a qcow2 image served as a file by
  qemu-storage-daemon's FUSE export (``qsd_export``), the last-resort ``sweep``;
- tools/bench's fio targets: a plain file, fusepool volumes (fresh, written, snapshot),
  qcow2 images (fresh, written, overlay);
- tools/compare-modes' targets: a pool in loop or direct mode, a kernel block device.
"""

import errno
import json
import os
import re
import signal
import stat
import subprocess
import time
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from .env import MiB, Refused, fusepool_command, run_fusepool, say, time_command
from .host import loop_backing_files
from .workloads import Workload, fill

# --- mounts and daemons -------------------------------------------------------------------


def mounts_under(path: str) -> list[tuple[str, str]]:
    """(mountpoint, filesystem type) of every mount at or below ``path``."""
    top = os.path.abspath(path).rstrip("/")
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if point == top or point.startswith(top + "/"):
                found.append((point, fields[2]))
    return found


def is_mounted(path: str) -> bool:
    return any(point == os.path.abspath(path) for point, _ in mounts_under(path))


def lazy_unmount(path: str) -> None:
    cmd = ["umount", "-l", path] if os.getuid() == 0 else ["fusermount3", "-u", "-z", path]
    subprocess.run(cmd, capture_output=True, check=False)


class FusepoolMount:
    """A pool mounted by a `fusepool mount` daemon; a context manager that always unmounts."""

    def __init__(self, pool_dir: str, mountpoint: str, *options: str):
        self.pool_dir = pool_dir
        self.mountpoint = mountpoint
        self.options = options  # extra `fusepool mount` options (--write-through)
        self.pid: int | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    def mount(self) -> float:
        """Mount; returns how long the `fusepool mount` command took."""
        os.makedirs(self.mountpoint, exist_ok=True)
        cmd = [*fusepool_command(), "mount", self.pool_dir, self.mountpoint, *self.options]
        try:
            elapsed = time_command(cmd)
        except RuntimeError:
            log = os.path.join(self.pool_dir, "fusepool.log")
            if os.path.exists(log):
                say("mount failed; the daemon log ends with:\n" + Path(log).read_text()[-2000:])
            self.umount()  # in case it got half-way
            raise
        with open(self.path(".fusepool"), "rb") as f:
            self.pid = json.loads(f.read())["pid"]
        return elapsed

    def umount(self) -> None:
        unmount_fusepool(self.mountpoint, self.pid)
        self.pid = None

    def __enter__(self) -> "FusepoolMount":
        self.mount()
        return self

    def __exit__(self, *exc) -> None:
        self.umount()


def unmount_fusepool(mountpoint: str, pid: int | None) -> None:
    """`fusepool umount`, else a lazy unmount; then make sure the daemon is gone."""
    if is_mounted(mountpoint):
        proc = subprocess.run([*fusepool_command(), "umount", mountpoint, "--force"],
                              capture_output=True, text=True, timeout=180)
        if proc.returncode or is_mounted(mountpoint):
            say(f"`fusepool umount {mountpoint}` failed ({proc.stderr.strip()}): lazy unmount")
            lazy_unmount(mountpoint)
    if pid is not None:
        deadline = time.monotonic() + 15
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if running(pid):
            say(f"the mount daemon (pid {pid}) is still running: SIGTERM")
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def running(pid: int) -> bool:
    """Alive and not a zombie (a daemon whose parent has exited waits a while to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


QSD_RUNNING: dict[int, tuple[subprocess.Popen, str]] = {}  # pid -> (process, export): for the last sweep


def qemu_option_value(path: str) -> str:
    return path.replace(",", ",,")  # qemu's option syntax doubles commas inside values


@contextmanager
def qsd_export(qsd: str, image: str, export: str):
    """Serve the qcow2 ``image`` as the regular file ``export`` (qemu-storage-daemon FUSE export)."""
    open(export, "a").close()  # a FUSE export mounts over an existing regular file
    log_path = export + ".log"
    cmd = [qsd, "--blockdev", f"driver=file,node-name=file0,filename={qemu_option_value(image)}",
           "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
           "--export", f"type=fuse,id=export0,node-name=disk0,mountpoint={qemu_option_value(export)},"
           "writable=on"]
    with open(log_path, "wb") as log:
        # Its own session: Ctrl-C reaches us, and we stop it in order (terminate, then unmount).
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    QSD_RUNNING[proc.pid] = (proc, export)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(export):
            if proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited ({proc.returncode}) before exporting "
                                   f"{image}: {Path(log_path).read_text().strip()[-1000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not export {image} within 30 s")
            time.sleep(0.01)
        yield export
    finally:
        stop_qsd(proc, export)


def stop_qsd(proc: subprocess.Popen, export: str) -> None:
    """Terminate (it unmounts its export on SIGTERM), kill if it hangs, lazy-unmount what is left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            say(f"qemu-storage-daemon (pid {proc.pid}) ignored SIGTERM: SIGKILL")
            proc.kill()
            proc.wait(timeout=15)
    if is_mounted(export):
        lazy_unmount(export)
    QSD_RUNNING.pop(proc.pid, None)


def sweep(work: str) -> list[str]:
    """Last resort on the way out: stop every daemon we started, unmount all under ``work``.

    Returns the mountpoints that are still mounted afterwards.
    """
    for proc, export in list(QSD_RUNNING.values()):
        stop_qsd(proc, export)
    for point, fstype in reversed(mounts_under(work)):
        say(f"still mounted on the way out: {point} ({fstype}): unmounting")
        if fstype == "fuse.fusepool":
            unmount_fusepool(point, None)
        else:
            lazy_unmount(point)
    return [point for point, _ in mounts_under(work)]


# --- tools/bench's fio targets ---------------------------------------------------------------------------


class Target:
    """Something fio runs on.  ``instance()`` yields the file for one run."""

    kind = ""  # "plain", "fusepool" or "qcow2"
    group = ""  # "plain", "fresh", "written" or "snapshot": what pairs with what
    remade = False  # made anew for every run (fresh and snapshot targets)
    informative = False  # shown for comparison, without ok/MISSED checks

    def __init__(self, key: str, label: str, pair: str | None = None):
        self.key, self.label, self.pair = key, label, pair

    def applies(self, workload: Workload) -> bool:
        return workload.writes or self.group != "fresh"

    def setup(self) -> None:
        pass

    @contextmanager
    def instance(self):
        raise NotImplementedError
        yield


class PlainTarget(Target):
    kind, group = "plain", "plain"

    def __init__(self, path: str, fio: str, size: int):
        super().__init__("plain", "plain file")
        self.file, self.fio, self.size = path, fio, size

    def setup(self) -> None:
        fill(self.fio, self.file, self.size)

    @contextmanager
    def instance(self):
        yield self.file


class FusepoolTarget(Target):
    """A volume of a mounted pool: fresh, written, or a snapshot of a written origin."""

    kind = "fusepool"
    made = 0  # a counter for unique names of remade volumes

    def __init__(self, key, label, pair, mount: FusepoolMount, group: str, fio: str, size: int):
        super().__init__(key, label, pair)
        self.mount, self.group, self.fio, self.size = mount, group, fio, size
        self.remade = group in ("fresh", "snapshot")
        self.base = f"{key}-origin" if group == "snapshot" else key
        self.informative = "--write-through" in mount.options  # no ok/MISSED checks

    def setup(self) -> None:
        if self.group in ("written", "snapshot"):
            run_fusepool("create", self.mount.pool_dir, self.base, "--size", self.size)
            fill(self.fio, self.mount.path(self.base), self.size)

    @contextmanager
    def instance(self):
        if self.group == "written":
            yield self.mount.path(self.base)
            return
        FusepoolTarget.made += 1
        name = f"{self.key}-{FusepoolTarget.made}"
        if self.group == "fresh":
            run_fusepool("create", self.mount.pool_dir, name, "--size", self.size)
        else:
            run_fusepool("snapshot", self.mount.pool_dir, self.base, name)
        try:
            yield self.mount.path(name)
        finally:
            os.unlink(self.mount.path(name))  # `rm` removes a volume (fio has closed it)


class Qcow2Target(Target):
    """A qcow2 image exported by qemu-storage-daemon: fresh, written, or an overlay."""

    kind = "qcow2"

    def __init__(self, key, label, group: str, work: str, tools: dict, source: str, size: int):
        super().__init__(key, label)
        self.group, self.tools, self.source, self.size = group, tools, source, size
        self.remade = group in ("fresh", "snapshot")
        self.image = os.path.join(work, f"{key}.qcow2")
        self.base = os.path.join(work, f"{key}-backing.qcow2")
        self.export = os.path.join(work, f"{key}.export")

    def qemu_img(self, *args) -> None:
        proc = subprocess.run([self.tools["qemu-img"], *map(str, args)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"qemu-img {' '.join(map(str, args))} failed: {proc.stderr.strip()}")

    def setup(self) -> None:
        # Written images are converted from the filled plain file: every cluster allocated.
        if self.group == "written":
            self.qemu_img("convert", "-f", "raw", "-O", "qcow2", self.source, self.image)
        elif self.group == "snapshot":
            self.qemu_img("convert", "-f", "raw", "-O", "qcow2", self.source, self.base)

    @contextmanager
    def instance(self):
        if self.group == "fresh":
            self.qemu_img("create", "-f", "qcow2", self.image, self.size)
        elif self.group == "snapshot":
            self.qemu_img("create", "-f", "qcow2", "-b", self.base, "-F", "qcow2", self.image)
        try:
            with qsd_export(self.tools["qemu-storage-daemon"], self.image, self.export) as path:
                yield path
        finally:
            if self.remade and os.path.exists(self.image):
                os.unlink(self.image)


# --- compare-modes' targets ------------------------------------------------------------------------------


class ModeTarget:
    """Something the workloads run on: two regions ("seq", "rand") of --size bytes each."""

    kind = ""  # "loop", "direct" or "kernel"

    def __init__(self, key: str, label: str, size: int):
        self.key, self.label, self.size = key, label, size

    def fresh(self, region: str, repeat: int) -> tuple[str, int] | None:
        """(path, offset) of a never-written region, or None when there is none."""
        raise NotImplementedError

    def region(self, region: str, repeat: int) -> tuple[str, int]:
        raise NotImplementedError

    def lower_files(self) -> list[str]:
        """Host files under the target (their page cache is a second copy; their extents fragment)."""
        return []


class PoolTarget(ModeTarget):
    """A fusepool pool, mounted for the run; one pair of volumes per repeat."""

    def __init__(self, key: str, label: str, size: int, pool_dir: str, mountpoint: str,
                 init_args: list[str], data_device: str | None = None):
        super().__init__(key, label, size)
        self.kind = key
        self.pool_dir, self.init_args, self.data_device = pool_dir, init_args, data_device
        self.mount = FusepoolMount(pool_dir, mountpoint)

    def setup(self, stack: ExitStack) -> None:
        run_fusepool("init", self.pool_dir, *self.init_args)
        self.mount.mount()
        stack.callback(self.mount.umount)

    @staticmethod
    def volume(region: str, repeat: int) -> str:
        return f"{region}{repeat}"

    def fresh(self, region: str, repeat: int) -> tuple[str, int]:
        if repeat:  # the previous repeat's volume makes room (in loop mode, its holes are punched)
            run_fusepool("remove", self.pool_dir, self.volume(region, repeat - 1))
        run_fusepool("create", self.pool_dir, self.volume(region, repeat), "--size", self.size)
        return self.region(region, repeat)

    def region(self, region: str, repeat: int) -> tuple[str, int]:
        return self.mount.path(self.volume(region, repeat)), 0

    @property
    def data_file(self) -> str:
        return self.data_device or os.path.join(self.pool_dir, "data")

    def lower_files(self) -> list[str]:
        return [] if self.data_device else [self.data_file]


class KernelTarget(ModeTarget):
    """A block device given with --kernel-device: "seq" is its first --size bytes, "rand" the next."""

    kind = "kernel"
    OFFSETS = {"seq": 0, "rand": 1}

    def __init__(self, key: str, label: str, size: int, device: str):
        super().__init__(key, label, size)
        self.device = device
        self.backing = loop_backing_files(device)

    def fresh(self, region: str, repeat: int) -> tuple[str, int] | None:
        return self.region(region, repeat) if repeat == 0 else None

    def region(self, region: str, repeat: int) -> tuple[str, int]:
        return self.device, self.OFFSETS[region] * self.size

    def lower_files(self) -> list[str]:
        return [b["file"] for b in self.backing if os.path.isfile(b["file"])]


def parse_kernel_device(spec: str) -> tuple[str, str]:
    """LABEL=PATH, PATH a block device not in use; one line saying why not otherwise."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise Refused(f"--kernel-device {spec!r}: expected LABEL=PATH, e.g. direct-lvm=/dev/docker/thin")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label) or label in ("loop", "direct"):
        raise Refused(f"--kernel-device {spec!r}: the label must be letters, digits, '.', '_' or '-', "
                      "and not 'loop' or 'direct' (the fusepool targets)")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Refused(f"--kernel-device {label}={path}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise Refused(f"--kernel-device {label}={path} is not a block device (give a kernel thin "
                      "volume, e.g. /dev/mapper/NAME)")
    return label, path


def check_kernel_device(label: str, path: str, size: int, force: bool) -> None:
    """Refuse a device that is in use, too small, or (unless --force) holds a filesystem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        why = ("it is in use (mounted or held by another program)" if exc.errno == errno.EBUSY
               else exc.strerror)
        raise Refused(f"--kernel-device {label}={path}: {why}") from None
    try:
        have = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if have < 2 * size:
        raise Refused(f"--kernel-device {label}={path} holds {have / MiB:,.0f} MiB; the workloads need "
                      f"{2 * size / MiB:,.0f} MiB (2 x --size)")
    if not force:
        from fusepool.datastore import device_signature

        signature = device_signature(path)
        if signature:
            raise Refused(f"--kernel-device {label}={path} is not empty (blkid finds {signature}) and "
                          "would be overwritten: wipe it (wipefs -a) or add --force")
