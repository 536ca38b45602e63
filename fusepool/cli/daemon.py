"""Handlers of ``mount`` (start the daemon, or serve in this process) and ``umount``."""

import errno
import os
import re
import sys
import time

from fusepool import control
from fusepool.cli import dispatch
from fusepool.cli.table import MOUNT_OPTIONS
from fusepool.errors import DaemonTimeout, NotMounted, PoolError


def forwarded_options(a, options=MOUNT_OPTIONS) -> list[str]:
    """The table's options as given (``forward``-ed ones), for the daemon's command line."""
    argv = []
    for arg in options:
        if not arg.forward:
            continue
        value = getattr(a, arg.dest)
        if arg.options.get("action") == "store_true":
            argv += [arg.flags[0]] if value else []
        elif arg.options.get("action") == "append":
            for item in value or ():
                argv += [arg.flags[0], str(item)]
        elif value is not None:
            argv += [arg.flags[0], str(value)]
    return argv


def mount(a) -> None:
    pool_dir = os.path.abspath(a.pool)
    mountpoint = os.path.abspath(a.mountpoint)
    dispatch.require_pool(pool_dir)
    if a.nbd:
        from fusepool.nbd import describe, parse_address

        a.nbd = [describe(parse_address(address)) for address in a.nbd]  # (as serve's)
    refuse_if_served(pool_dir)
    if a.foreground:
        return run_foreground(pool_dir, mountpoint, a)
    start_daemon(pool_dir, ["mount", pool_dir, mountpoint, *forwarded_options(a)], a.debug)


def start_daemon(pool_dir: str, argv: list[str], debug: bool) -> None:
    """Start ``fusepool ARGV --foreground`` as a fresh process (its output in
    POOL/fusepool.log) and wait until it says it is ready, or why it is not."""
    import subprocess

    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "fusepool"] + (["--debug"] if debug else []) + [
        *argv, "--foreground", "--ready-fd", str(write_fd)]
    log_path = os.path.join(pool_dir, "fusepool.log")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    os.fchmod(log_fd, 0o600)  # owner-only like every file of the pool, whatever the umask
    with open(log_fd, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                pass_fds=(write_fd,), start_new_session=True, cwd="/")
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message == "ready":
        return
    proc.wait(timeout=30)
    match = re.match(r"error (\d+): (.*)", message, re.S)
    if match:
        error = PoolError(match.group(2))
        error.exit_status = int(match.group(1))
        raise error
    raise PoolError(f"the {argv[0]} daemon exited with status {proc.returncode}; see {log_path}")


def refuse_if_served(pool_dir: str) -> None:
    """A pool has one daemon: say which one serves it already."""
    running = dispatch.daemon_status(pool_dir)
    if running:
        how = (f"mounted at {running['mountpoint']}" if running.get("mountpoint") else
               "served over NBD at " + ", ".join(running.get("nbd") or ["?"]))
        raise PoolError(f"pool {pool_dir} is already {how} (pid {running['pid']}); "
                        f"`fusepool stop {pool_dir}` stops it")


def run_foreground(pool_dir: str, mountpoint: str, a) -> None:
    import logging

    from fusepool.mount import serve

    ready_file = os.fdopen(a.ready_fd, "w") if a.ready_fd is not None else None
    log = logging.getLogger("fusepool")

    def on_ready():
        log.info("mounted %s on %s (pid %d)", pool_dir, mountpoint, os.getpid())
        if ready_file:
            ready_file.write("ready\n")
            ready_file.close()

    options = {}  # the forwarded options, as serve's keywords
    for arg in MOUNT_OPTIONS:
        if arg.forward:
            value = getattr(a, arg.dest)
            options[arg.keyword or arg.dest] = arg.convert(value) if arg.convert else value
    try:
        serve(pool_dir, mountpoint, on_ready=on_ready, **options)
    except PoolError as exc:
        if ready_file and not ready_file.closed:
            ready_file.write(f"error {exc.exit_status}: {exc}\n")
            ready_file.close()
        raise


def umount(a) -> None:
    """Unmount by asking the pool's daemon: which pool comes from the kernel's mount
    table (the mount's source), and the daemon must confirm the mountpoint is its own."""
    from fusepool.mounts import FSTYPE, find_mount, lazy_unmount

    mountpoint = os.path.abspath(a.mountpoint)
    entry = find_mount(mountpoint)
    if entry is None:
        if not os.path.lexists(mountpoint):
            raise NotMounted(f"{mountpoint}: no such directory")
        raise NotMounted(f"{mountpoint} is not a fusepool mount (nothing is mounted there)")
    if entry.fstype != FSTYPE:
        raise NotMounted(f"{mountpoint} is not a fusepool mount (it is {entry.fstype})")
    mountpoint = entry.mountpoint
    deadline = time.monotonic() + a.timeout
    try:
        reply = control.request(entry.source, "unmount", {"force": a.force, "mountpoint": mountpoint},
                                timeout=a.timeout)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        # No daemon answers for that pool.  A mount whose daemon died answers ENOTCONN
        # at once (and a live one of another program is left alone).  readdir, not
        # stat: the kernel may answer stat from its attribute cache for a second.
        try:
            os.listdir(mountpoint)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                lazy_unmount(mountpoint)
                print(f"cleared the stale mount at {mountpoint} (its daemon had died)")
                return
        raise NotMounted(f"no fusepool daemon serves {mountpoint} (pool {entry.source} "
                         "does not answer)") from None
    except DaemonTimeout as exc:
        if not a.force:
            raise DaemonTimeout(f"{exc}; nothing was unmounted (`fusepool umount --force` "
                                "detaches the mount anyway)") from None
        lazy_unmount(mountpoint)
        print(f"detached {mountpoint}: its daemon did not answer within {a.timeout:g} s; it exits "
              "when it runs again, and the pool keeps its last commit", file=sys.stderr)
        return
    pid = reply["pid"]
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise PoolError(f"the mount daemon (pid {pid}) has not exited after {a.timeout:g} s")
        time.sleep(0.01)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for its parent has finished."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
