"""Why a FUSE mount failed, in one line naming the cause and the fix.

pyfuse3.init only says ``fuse_session_mount failed``; libfuse and fusermount3
print the real cause on stderr.  :func:`init_fuse` captures those lines while
mounting, keeps them (they are replayed on stderr, i.e. the mount log) and turns
them, with a look at /dev/fuse, into a :class:`MountFailed` subclass whose
message is what the user sees from ``fusepool mount``.  docs/containers.md has
the recipes the messages point to.
"""

import contextlib
import os
import tempfile

import pyfuse3

from fusepool.errors import PoolError

FUSE_DEVICE = "/dev/fuse"
UNPRIVILEGED_FIX = "add --cap-add SYS_ADMIN (in a container) or run inside `unshare -Urm`"


class MountFailed(PoolError):
    """The kernel mount of the FUSE file system failed (nothing was mounted)."""


class NoFuseDevice(MountFailed):
    """/dev/fuse is missing (a container started without it) or the kernel has no FUSE."""


class FuseDeviceDenied(MountFailed):
    """/dev/fuse exists but this user may not open it for reading and writing."""


class MountNotPermitted(MountFailed):
    """Neither mount(2) nor fusermount3 may mount here (no CAP_SYS_ADMIN over this mount namespace)."""


class FusermountMissing(MountFailed):
    """mount(2) was refused and fusermount3, which mounts for unprivileged users, is not installed."""


def init_fuse(ops, mountpoint: str, options) -> None:
    """``pyfuse3.init``, its failures raised as a :class:`MountFailed` naming cause and fix."""
    with tempfile.TemporaryFile() as said:
        try:
            with _stderr_to(said.fileno()):  # libfuse's and fusermount3's messages
                pyfuse3.init(ops, mountpoint, options)
        except (RuntimeError, OSError) as exc:
            failure = exc
        else:
            failure = None
        said.seek(0)
        text = said.read().decode(errors="replace")
    if text:
        os.write(2, text.encode())  # their own words stay in the log
    if failure is not None:
        raise diagnose(mountpoint, text, failure) from None


@contextlib.contextmanager
def _stderr_to(fd: int):
    """Point file descriptor 2 (C code and child processes write there) at ``fd`` for a while."""
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def diagnose(mountpoint: str, said: str, exc: BaseException) -> MountFailed:
    """The error for a failed mount, from what libfuse/fusermount3 printed and /dev/fuse itself."""
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    last = lines[-1] if lines else str(exc)
    where = f"cannot mount {mountpoint}"
    uid = os.geteuid()
    if not os.path.exists(FUSE_DEVICE):
        return NoFuseDevice(f"{where}: {FUSE_DEVICE} is missing: start the container with "
                            f"--device {FUSE_DEVICE} (on a host: modprobe fuse)")
    if "device not found" in said:  # the node exists but the kernel has no FUSE behind it
        return NoFuseDevice(f"{where}: {FUSE_DEVICE} does not answer (no FUSE in this kernel?): "
                            "modprobe fuse on the host")
    if f"failed to open {FUSE_DEVICE}" in said or not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        try:
            mode = f"mode {os.stat(FUSE_DEVICE).st_mode & 0o777:04o}"
        except OSError as err:
            mode = err.strerror
        return FuseDeviceDenied(f"{where}: {FUSE_DEVICE} is not readable and writable by uid {uid} "
                                f"({mode}): make it so (chmod 0666 {FUSE_DEVICE}, the distributions' "
                                "default), or pass the device to the container with --device "
                                f"{FUSE_DEVICE}")
    if "failed to exec fusermount" in said:
        fix = "install fuse3 (Debian: apt-get install fuse3)"
        if uid == 0:  # root without CAP_SYS_ADMIN: fusermount3 would be refused too
            fix += f", or {UNPRIVILEGED_FIX}"
        return FusermountMissing(f"{where}: uid {uid} may not mount directly and fusermount3 is not "
                                 f"installed: {fix}")
    if "Operation not permitted" in last:
        return MountNotPermitted(f"{where}: mounting is not permitted here ({last}): {UNPRIVILEGED_FIX}")
    return MountFailed(f"{where}: {last}")
