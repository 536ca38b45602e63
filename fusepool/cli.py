"""The ``fusepool`` command: one function per subcommand over library calls.

Pool commands go to the mount daemon through the control socket when the pool
is mounted, and open the pool directly (under its lock) when it is not; both
paths run the same code in :mod:`fusepool.commands`.  Errors print one line on
stderr and exit 1 (operation failed) or 2 (usage error).  Heavy modules
(trio, pyfuse3, the engine) are imported only by the commands that need them,
so short commands start fast.
"""

import argparse
import errno
import json
import math
import os
import re
import stat
import sys
import time

from fusepool import __version__, control
from fusepool.errors import DaemonTimeout, InvalidArgument, NotMounted, PoolError, UsageError
from fusepool.units import human_size, parse_percent, parse_size

# --- routing: daemon or direct --------------------------------------------------------

def require_pool(pool_dir: str):
    """The pool's config (a clear "not a pool" error otherwise)."""
    from fusepool.config import PoolConfig

    return PoolConfig.load(os.path.abspath(pool_dir))


def pool_call(pool_dir: str, op: str, args: dict | None = None, output=None):
    """Run a pool command online (through the daemon) or offline (directly).

    A command that streams its output (``dump``) writes it to ``output``, a
    binary file object, and returns the rest of its result.
    """
    pool_dir = os.path.abspath(pool_dir)
    require_pool(pool_dir)
    try:
        if op in control.SNAPSHOT_OPS:  # walked here, on a commit the daemon holds
            from fusepool.reporting import run_on_snapshot

            return run_on_snapshot(pool_dir, op, args or {}, output=output)
        return control.request(pool_dir, op, args or {}, output=output)
    except (FileNotFoundError, ConnectionRefusedError):
        pass  # no daemon: open the pool ourselves
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="fusepool: %(message)s")
    from fusepool import commands
    from fusepool.engine import Pool

    with Pool.open(pool_dir) as pool:
        result = commands.run(pool, op, args or {})
        if isinstance(result, control.Streamed):
            for piece in result.chunks:
                output.write(piece.encode() if isinstance(piece, str) else piece)
            result = result.result
        return result


def daemon_status(pool_dir: str) -> dict | None:
    try:
        return control.request(pool_dir, "status", timeout=5)
    except (OSError, PoolError):
        return None


def emit_json(value) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


# --- subcommands ----------------------------------------------------------------------------

def cmd_init(a) -> None:
    from fusepool.engine import Pool

    block_size = parse_size(a.block_size)
    data_size = Pool.create(
        a.pool, data_size=parse_size(a.data_size) if a.data_size is not None else None,
        metadata_size=parse_size(a.metadata_size), block_size=block_size,
        base_size=parse_size(a.base_size), min_free_space=parse_percent(a.min_free_space),
        skip_block_zeroing=a.skip_block_zeroing, no_space_timeout=a.no_space_timeout,
        mode=a.mode, data_device=a.data_device, preallocate=a.preallocate, force=a.force,
        zero_detection=a.zero_detection, **space_settings(a))
    config = require_pool(a.pool)
    where = (f"on {config.data_device}" if config.data_device else
             "preallocated" if config.preallocated else "sparse")
    print(f"created pool {os.path.abspath(a.pool)} ({config.mode} mode, block size "
          f"{human_size(block_size)}, data {human_size(data_size)} {where})")


def space_settings(a) -> dict:
    """The autoextend/low-water options given (init and set share them)."""
    given = {"autoextend_threshold": a.autoextend_threshold, "autoextend_percent": a.autoextend_percent,
             "max_data_size": parse_size(a.max_data_size) if a.max_data_size is not None else None,
             "low_water_mark": a.low_water_mark, "on_low_water": a.on_low_water}
    return {k: v for k, v in given.items() if v is not None}


def cmd_set(a) -> None:
    settings = space_settings(a)
    if a.zero_detection is not None:
        settings["zero_detection"] = a.zero_detection == "on"
    if not settings:
        raise UsageError("nothing to set: give --autoextend-threshold, --autoextend-percent, "
                         "--max-data-size, --low-water-mark, --on-low-water and/or --zero-detection")
    st = pool_call(a.pool, "set", settings)
    print(f"autoextend: {describe_autoextend(st)}; low-water mark: {describe_low_water(st)}; "
          f"zero detection: {'on' if st.get('zero_detection') else 'off'}")


def describe_autoextend(st: dict) -> str:
    if st.get("autoextend_threshold", 100) >= 100:
        return "off"
    text = f"at {st['autoextend_threshold']:g}% used, grow by {st['autoextend_percent']:g}%"
    return text + (f", up to {human_size(st['max_data_size'])}" if st.get("max_data_size") else "")


def describe_low_water(st: dict) -> str:
    if not st.get("low_water_mark"):
        return "off"
    hook = st.get("on_low_water")
    return f"{st['low_water_mark']} blocks" + (f", runs {hook}" if hook else "")


def cmd_mount(a) -> None:
    pool_dir = os.path.abspath(a.pool)
    mountpoint = os.path.abspath(a.mountpoint)
    require_pool(pool_dir)
    running = daemon_status(pool_dir)
    if running:
        raise PoolError(f"pool {pool_dir} is already mounted at {running['mountpoint']} "
                        f"(pid {running['pid']})")
    if a.foreground:
        return run_foreground(pool_dir, mountpoint, a)
    # Background: start the daemon as a fresh process and wait until it says it is ready.
    import subprocess

    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "fusepool"] + (["--debug"] if a.debug else []) + [
        "mount", pool_dir, mountpoint, "--foreground", "--commit-period", str(a.commit_period),
        "--ready-fd", str(write_fd)] + (["--allow-other"] if a.allow_other else []) + (
        ["--write-through"] if a.write_through else []) + (
        ["--nonempty"] if a.nonempty else []) + (
        ["--no-space-timeout", str(a.no_space_timeout)] if a.no_space_timeout is not None else [])
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
    raise PoolError(f"the mount daemon exited with status {proc.returncode}; see {log_path}")


def run_foreground(pool_dir: str, mountpoint: str, a) -> None:
    from fusepool.mount import serve

    ready_file = os.fdopen(a.ready_fd, "w") if a.ready_fd is not None else None

    import logging

    log = logging.getLogger("fusepool")

    def on_ready():
        log.info("mounted %s on %s (pid %d)", pool_dir, mountpoint, os.getpid())
        if ready_file:
            ready_file.write("ready\n")
            ready_file.close()

    try:
        serve(pool_dir, mountpoint, a.commit_period, on_ready, allow_other=a.allow_other,
              no_space_timeout=a.no_space_timeout, writeback_cache=not a.write_through,
              nonempty=a.nonempty)
    except PoolError as exc:
        if ready_file and not ready_file.closed:
            ready_file.write(f"error {exc.exit_status}: {exc}\n")
            ready_file.close()
        raise


def cmd_umount(a) -> None:
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


def cmd_create(a) -> None:
    size = parse_size(a.size) if a.size is not None else None
    dev = pool_call(a.pool, "create", {"name": a.name, "size": size})
    print(f"created volume {dev['name']} (device id {dev['dev_id']}, {human_size(dev['size'])})")


def mounted_volume(pool_dir: str, name: str, cached_only: bool = False) -> tuple[str | None, bool]:
    """``(path of the volume in the mount, whether the kernel caches its writes)``."""
    status = daemon_status(os.path.abspath(pool_dir))
    cached = bool(status and status.get("writeback_cache"))
    if not status or (cached_only and not cached):
        return None, False
    path = os.path.join(status["mountpoint"], name)
    if not os.path.isfile(path):
        return None, False
    return path, cached


def cached_volume(pool_dir: str, name: str) -> str | None:
    """The volume's path in the mount when the kernel caches its writes (the default)."""
    return mounted_volume(pool_dir, name, cached_only=True)[0]


def fsync_path(path: str) -> None:
    # Commands that must see every write made so far (snapshot, discard, resize, export)
    # flush the kernel's cache first, as LVM suspends (flushes) an origin before
    # snapshotting it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # a write-only volume (chmod 200): fsync needs any open
        fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cmd_snapshot(a) -> None:
    path = cached_volume(a.pool, a.origin)
    if path is not None:
        fsync_path(path)
    dev = pool_call(a.pool, "snapshot", {"origin": a.origin, "name": a.name})
    print(f"created snapshot {dev['name']} of {a.origin} (device id {dev['dev_id']})")


def cmd_remove(a) -> None:
    res = pool_call(a.pool, "remove", {"name": a.name})
    note = " (deferred: still open; freed at last close)" if res["deferred"] else ""
    print(f"removed volume {a.name}{note}")


def cmd_resize(a) -> None:
    text = a.size
    relative = text.startswith("+")
    if text.startswith("-"):
        raise UsageError("volumes cannot shrink")
    size = parse_size(text.removeprefix("+"))  # "++1M" stays invalid
    path = cached_volume(a.pool, a.name)
    if path is not None:  # the kernel owns the size of a cached volume: resize through it
        fsync_path(path)  # and the resize's commit covers every write made before it
        current = os.stat(path).st_size
        size = current + size if relative else size
        if size < current:  # (the engine's error, as when the daemon refuses it)
            raise InvalidArgument(f"cannot shrink volume {a.name!r} from {current} to {size} "
                                  "bytes: volumes only grow")
        try:
            os.truncate(path, size)
        except OSError as exc:
            raise PoolError(f"cannot resize volume {a.name!r} to {size} bytes: {exc.strerror}") from None
        print(f"volume {a.name} is now {size} bytes ({human_size(size)})")
        return
    dev = pool_call(a.pool, "resize", {"name": a.name, "size": size, "relative": relative})
    print(f"volume {dev['name']} is now {dev['size']} bytes ({human_size(dev['size'])})")


def cmd_list(a) -> None:
    if a.format == "thin_ls":
        return list_thin_ls(a)
    vols = pool_call(a.pool, "list")
    if a.json:
        return emit_json(vols)
    rows = [("NAME", "DEV_ID", "SIZE", "MAPPED", "EXCLUSIVE", "SHARED", "ORIGIN")]
    for v in vols:
        bs = v["mapped_bytes"] // v["mapped_blocks"] if v["mapped_blocks"] else 0
        rows.append((v["name"], str(v["dev_id"]), human_size(v["size"]), human_size(v["mapped_bytes"]),
                     human_size(v["exclusive_blocks"] * bs), human_size(v["shared_blocks"] * bs),
                     v["origin"] or "-"))
    print_table(rows)


def list_thin_ls(a) -> None:
    """thin_ls's columns (blocks, times), plus the volume name fusepool knows."""
    rows = pool_call(a.pool, "thin_ls")
    if a.json:
        return emit_json(rows)
    table = [("DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "TRANSACTION",
              "CREATE_TIME", "SNAP_TIME", "NAME")]
    for r in rows:
        table.append((str(r["dev_id"]), str(r["mapped_blocks"]), str(r["exclusive_blocks"]),
                      str(r["shared_blocks"]), str(r["transaction"]), str(r["creation_time"]),
                      str(r["snap_time"]), r["name"]))
    print_table(table)


def print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_info(a) -> None:
    st = pool_call(a.pool, "info")
    status = daemon_status(os.path.abspath(a.pool))
    st["mounted"] = status["mountpoint"] if status else None
    if a.json:
        return emit_json(st)
    print(format_info(st))


def format_info(st: dict) -> str:
    """Docker's devicemapper ``docker info`` block, same names and size format."""
    lines = [
        ("Pool Name", st["pool_name"]),
        ("Pool Blocksize", human_size(st["block_size"])),
        ("Base Device Size", human_size(st["base_size"])),
        ("Backing Filesystem", st["backing_filesystem"]),
        ("Data file", st["data_file"]),
        ("Metadata file", st["metadata_file"]),
        ("Data Space Used", human_size(st["data_space_used"])),
        ("Data Space Total", human_size(st["data_space_total"])),
        ("Data Space Available", human_size(st["data_space_available"])),
        ("Metadata Space Used", human_size(st["metadata_space_used"])),
        ("Metadata Space Total", human_size(st["metadata_space_total"])),
        ("Metadata Space Available", human_size(st["metadata_space_available"])),
        ("Thin Pool Minimum Free Space", human_size(st["min_free_space"])),
        ("Deferred Removal Enabled", "true"),
        ("Deferred Deletion Enabled", "true"),
        ("Deferred Deleted Device Count", str(st["deferred_deleted_device_count"])),
        ("Library Version", st["library_version"]),
        ("Mode", st["mode"]),
        ("Autoextend", describe_autoextend(st)),
        ("Low Water Mark", describe_low_water(st)),
        ("No Space Policy", f"queue ({st['no_space_timeout']:g} s)" if st.get("no_space_timeout")
         else "error"),
        ("Zero Detection", "on" if st.get("zero_detection") else "off"),
        ("Volumes", str(st["volume_count"])),
        ("Mounted At", st.get("mounted") or "-"),
    ]
    if st.get("read_only"):
        lines.append(("Read Only", st["read_only"]))
    return "Storage Driver: fusepool\n" + "\n".join(f" {k}: {v}" for k, v in lines)


def cmd_inspect(a) -> None:
    emit_json(pool_call(a.pool, "inspect", {"name": a.name}))


def cmd_map(a) -> None:
    extents = pool_call(a.pool, "map", {"name": a.name})
    if a.json:
        return emit_json(extents)
    rows = [("OFFSET", "LENGTH", "VIRTUAL_BLOCK", "DATA_BLOCK", "BLOCKS", "STATE")]
    for e in extents:
        rows.append((str(e["offset"]), str(e["length"]), str(e["virtual_block"]), str(e["data_block"]),
                     str(e["blocks"]), "shared" if e["shared"] else "exclusive"))
    print_table(rows)


def cmd_discard(a) -> None:
    path, cached = mounted_volume(a.pool, a.name)
    if cached:
        fsync_path(path)  # or a cached write would land after the discard
    res = pool_call(a.pool, "discard", {"name": a.name, "offset": parse_size(a.offset),
                                        "length": parse_size(a.length)})
    if path is not None:  # pages the kernel still caches would show the old bytes
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    print(f"unmapped {res['unmapped_blocks']} block(s) of {a.name}")


def cmd_extend(a) -> None:
    if a.data_size is None and a.metadata_size is None:
        raise UsageError("nothing to extend: give --data-size and/or --metadata-size")
    st = pool_call(a.pool, "extend", {
        "data_size": parse_size(a.data_size) if a.data_size is not None else None,
        "metadata_size": parse_size(a.metadata_size) if a.metadata_size is not None else None})
    print(f"data space {human_size(st['data_space_total'])}, "
          f"metadata space {human_size(st['metadata_space_total'])}")


def progress_bar(label: str):
    """A progress callback drawing on stderr when it is a terminal (else silent)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        text = f"{done}/{total}" if total else f"{done}"
        sys.stderr.write(f"\r{label}: {text} pages read ")
        sys.stderr.flush()

    return show


def cmd_check(a) -> int:
    from fusepool.check import check_offline

    pool_dir = os.path.abspath(a.pool)
    require_pool(pool_dir)
    try:
        from fusepool.reporting import check_on_snapshot

        report = check_on_snapshot(pool_dir, progress_bar("checking"))
        if not isinstance(report, dict):
            report = report.to_json()
    except (FileNotFoundError, ConnectionRefusedError):
        report = check_offline(pool_dir, progress_bar("checking")).to_json()
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    if a.json:
        emit_json(report)
    else:
        print(f"transaction {report['transaction']}: {report['devices']} devices, {report['nodes']} "
              f"node pages, {report['mappings']} mappings, {report['used_blocks']} of "
              f"{report['data_blocks']} data blocks in use")
        for note in report["notes"]:
            print(f"note: {note}")
        for p in report["problems"]:
            print(f"{'error' if p['fatal'] else 'leak'}: {p['kind']}: {p['message']}")
        print("clean" if report["ok"] else f"{len(report['problems'])} problem(s) found; "
              f"`fusepool repair {a.pool}` rebuilds what can be rebuilt")
    return 0 if report["ok"] else 1


def cmd_repair(a) -> None:
    from fusepool.check import repair

    pool_dir = os.path.abspath(a.pool)
    require_pool(pool_dir)
    status = daemon_status(pool_dir)
    if status:
        raise PoolError(f"pool {pool_dir} is mounted at {status['mountpoint']}: unmount it before repair")
    for line in repair(pool_dir, progress_bar("reading")):
        print(line)


def cmd_dump(a) -> None:
    import contextlib

    from fusepool.outputs import check_output, open_output

    pool_dir = os.path.abspath(a.pool)
    require_pool(pool_dir)
    for path in (a.output, a.names):  # refused before any work (never a symlink or a pool file)
        if path:
            check_output(path, pool_dir)
    with (open(open_output(a.output, pool_dir), "wb") if a.output
          else contextlib.nullcontext(sys.stdout.buffer)) as out:
        from fusepool.progress import counting

        with counting(out, "dump") as shown:  # progress on a terminal: a big dump takes a while
            res = pool_call(a.pool, "dump", output=shown)
    if a.names:
        with open(open_output(a.names, pool_dir), "w") as f:
            json.dump(res["names"], f, indent=2)
            f.write("\n")


def cmd_restore(a) -> None:
    from fusepool.interop.thin_xml import read_names, read_xml, restore

    try:
        with open(a.input) as f:
            ir = read_xml(f)
    except OSError as exc:
        raise UsageError(f"{a.input}: {exc.strerror}") from None
    from fusepool.outputs import check_restore_data

    check_restore_data(a.data, a.pool)
    metadata_size = parse_size(a.metadata_size) if a.metadata_size else None
    names = restore(ir, read_names(a.names), a.data, a.pool, metadata_size)
    print(f"restored {len(names)} volume(s) into {os.path.abspath(a.pool)}: {', '.join(names) or '-'}")


def cmd_import_docker(a) -> None:
    from fusepool.interop.docker import import_docker

    names = import_docker(a.docker_dir, a.pool)
    print(f"imported {len(names)} device(s) into {os.path.abspath(a.pool)}: {', '.join(names) or '-'}")


def cmd_delta(a) -> None:
    res = pool_call(a.pool, "delta", {"left": a.left, "right": a.right})
    if a.json:
        return emit_json(res["ranges"])
    from fusepool.interop.images import delta_xml

    print(delta_xml(res["ranges"], res["left"], res["right"], res["header"]))


def cmd_export(a) -> None:
    from fusepool.interop.images import export_image
    from fusepool.outputs import check_output

    pool_dir = os.path.abspath(a.pool)
    require_pool(pool_dir)
    check_output(a.file, pool_dir)  # before the temporary snapshot (export_image checks again)
    status = daemon_status(pool_dir)
    if status:  # online: read a temporary snapshot through the mount (a consistent copy)
        path = cached_volume(pool_dir, a.name)
        if path is not None:  # (as cmd_snapshot: writes still in the kernel's cache first)
            fsync_path(path)
        temp = f"{a.name}.export-{os.getpid()}"
        pool_call(pool_dir, "snapshot", {"origin": a.name, "name": temp})
        try:
            dev = pool_call(pool_dir, "inspect", {"name": temp})
            extents = pool_call(pool_dir, "map", {"name": temp})
            with open(os.path.join(status["mountpoint"], temp), "rb") as f:
                size = int(dev["Data"]["DeviceSize"])
                copied = export_image(extents, size, lambda off, n: os.pread(f.fileno(), n, off),
                                      a.file, a.sparse, pool_dir=pool_dir)
        finally:
            pool_call(pool_dir, "remove", {"name": temp})
    else:
        from fusepool import commands
        from fusepool.engine import Pool

        with Pool.open(pool_dir) as pool:
            dev = pool.volume(a.name)
            extents = commands.run(pool, "map", {"name": a.name})
            size = dev.size
            copied = export_image(extents, size, lambda off, n: pool.read(dev.dev_id, off, n),
                                  a.file, a.sparse, pool_dir=pool_dir)
    print(f"exported {a.name} ({size} bytes, {copied} bytes of data) to {a.file}")


def cmd_import(a) -> None:
    from fusepool.interop.images import import_image
    from fusepool.outputs import check_input

    pool_dir = os.path.abspath(a.pool)
    config = require_pool(pool_dir)
    status = daemon_status(pool_dir)
    check_input(a.file, pool_dir, status["mountpoint"] if status else None)
    try:  # a file or a block device; a FIFO would block the open with the pool locked
        st = os.stat(a.file)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"{a.file} is not a file or a block device")
        image_size = st.st_size
        if stat.S_ISBLK(st.st_mode):  # whose st_size is 0
            from fusepool.interop.thin_xml import image_size as device_size

            image_size = device_size(a.file)
    except OSError as exc:
        raise UsageError(f"{a.file}: {exc.strerror}") from None
    size = max(parse_size(a.size) if a.size else 0, image_size)
    if status:  # online: create through the daemon, write through the mount
        pool_call(pool_dir, "create", {"name": a.name, "size": size})
        try:
            fd = os.open(os.path.join(status["mountpoint"], a.name), os.O_WRONLY)
            try:
                stored = import_image(a.file, config.block_size, lambda off, d: _pwrite_all(fd, d, off),
                                      size=image_size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            pool_call(pool_dir, "remove", {"name": a.name})  # no half-made volume
            raise
    else:
        from fusepool.engine import Pool

        with Pool.open(pool_dir) as pool:
            dev = pool.create_volume(a.name, size)
            try:
                stored = import_image(a.file, pool.block_size,
                                      lambda off, d: _engine_write_all(pool, dev.dev_id, off, d),
                                      size=image_size)
                pool.commit()
            except BaseException:
                pool.remove(a.name)
                raise
    print(f"imported {a.file} into {a.name} ({size} bytes, {stored} bytes stored)")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _engine_write_all(pool, dev_id: int, offset: int, data: bytes) -> None:
    from fusepool.errors import PoolFull

    view = memoryview(data)
    while view:
        n = pool.write(dev_id, offset, view)
        if not n:
            raise PoolFull("pool is out of data space")
        view, offset = view[n:], offset + n


# --- the parser -------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"fusepool: error: {message} (see `{self.prog} --help`)\n")


class _Unused:
    """Takes the place of a sub-parser that this invocation does not need (see build_parser)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, just that command's sub-parser.

    Building all ~25 sub-parsers costs ~20 ms (argparse looks up a translation
    for every help string), a fifth of a short command's run time.
    """
    p = Parser(prog="fusepool", description="A thin pool in user space: dm-thin style thin volumes "
               "and snapshots as sparse files in a FUSE mount.")
    p.add_argument("--version", action="version", version=f"fusepool {__version__}")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    p.commands = sub.choices  # name -> sub-parser, of those built

    def add(name, func, help_):
        if only is not None and name != only:
            return _Unused()
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        return sp

    sp = add("init", cmd_init, "create a new pool directory")
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.epilog = INIT_EPILOG
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("--data-size", metavar="SIZE",
                    help="data space (default 100G; with --data-device: the whole device)")
    sp.add_argument("--metadata-size", default="2G", metavar="SIZE", help="metadata space (default 2G)")
    sp.add_argument("--block-size", default="64K", metavar="SIZE",
                    help="pool block size: a multiple of 64K up to 1G (default 64K)")
    sp.add_argument("--base-size", default="10G", metavar="SIZE",
                    help="default size of new volumes (default 10G)")
    sp.add_argument("--min-free-space", default="10%", metavar="PERCENT",
                    help="refuse new volumes/snapshots below this free space (default 10%%)")
    sp.add_argument("--skip-block-zeroing", action="store_true",
                    help="do not zero new blocks on partial writes (stale data may show)")
    sp.add_argument("--zero-detection", action="store_true",
                    help="store nothing for writes of zeros into unmapped blocks and unmap blocks "
                    "that writes leave all zeros (qemu's detect-zeroes=unmap; default off: zeros "
                    "are provisioned like any data, as dm-thin does)")
    sp.add_argument("--no-space-timeout", type=non_negative_float, default=0.0, metavar="SECONDS",
                    help="out of data space: let allocating writes wait this long for space "
                    "before failing with ENOSPC (dm-thin's queue mode; default 0: fail at once)")
    sp.add_argument("--mode", choices=["loop", "direct"],
                    help="loop: sparse data file (default); direct: block device or preallocated "
                    "file, O_DIRECT")
    sp.add_argument("--data-device", metavar="PATH",
                    help="direct mode on this block device (the pool directory keeps the metadata)")
    sp.add_argument("--preallocate", action="store_true",
                    help="direct mode on POOL/data, allocated in full now")
    sp.add_argument("--force", action="store_true",
                    help="use a --data-device that holds a filesystem or partition table")
    add_space_options(sp)

    sp = add("mount", cmd_mount, "mount a pool: each volume becomes MOUNTPOINT/NAME")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--foreground", action="store_true", help="serve in this process")
    sp.add_argument("--commit-period", type=positive_float, default=1.0, metavar="SECONDS",
                    help="commit metadata at least this often when changed (default 1)")
    sp.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    sp.add_argument("--no-space-timeout", type=non_negative_float, metavar="SECONDS",
                    help="override the pool's out-of-space wait for this mount")
    cache = sp.add_mutually_exclusive_group()
    cache.add_argument("--write-through", action="store_true",
                       help="send every write to the daemon before it returns, so that errors "
                       "(out of space) show at write(); the default is the kernel's writeback "
                       "cache, as for a kernel thin volume's block device: writes return once "
                       "cached, errors show at fsync or close (see README)")
    cache.add_argument("--writeback-cache", action="store_true",
                       help="the default (kept for compatibility; does nothing)")
    sp.add_argument("--nonempty", action="store_true",
                    help="mount even if MOUNTPOINT holds files (the mount hides them)")
    sp.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    sp = add("umount", cmd_umount, "commit, unmount and wait for the daemon to exit")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--force", action="store_true", help="unmount even with volumes open")
    sp.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS")

    sp = add("create", cmd_create, "create a thin volume")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--size", metavar="SIZE", help="virtual size (default: the pool's base size)")

    sp = add("snapshot", cmd_snapshot, "create a writable snapshot of a volume")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("origin", metavar="ORIGIN")
    sp.add_argument("name", metavar="NAME")

    sp = add("remove", cmd_remove, "remove a volume (deferred while it is open)")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("name", metavar="NAME")

    sp = add("resize", cmd_resize, "grow a volume to SIZE or by +SIZE")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("size", metavar="SIZE|+SIZE")

    sp = add("list", cmd_list, "list volumes")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--format", choices=["table", "thin_ls"], default="table",
                    help="thin_ls: thin_ls's columns (DEV MAPPED_BLOCKS EXCLUSIVE_BLOCKS ...)")

    sp = add("info", cmd_info, "pool statistics, as `docker info` prints them")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("--json", action="store_true", help="exact byte counts")

    sp = add("inspect", cmd_inspect, "one volume, as Docker's GraphDriver JSON")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("name", metavar="NAME")

    sp = add("map", cmd_map, "mapped extents of a volume, shared or exclusive")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--json", action="store_true")

    sp = add("discard", cmd_discard, "unmap the whole blocks inside a byte range")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("offset", metavar="OFFSET")
    sp.add_argument("length", metavar="LENGTH")

    sp = add("dump", cmd_dump, "write the pool's metadata as thin_dump XML")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    sp.add_argument("--names", metavar="FILE", help="also write volume names and sizes (JSON) to FILE")

    sp = add("restore", cmd_restore, "make a new pool from thin_dump XML and a data image")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("-i", "--input", required=True, metavar="FILE", help="thin_dump XML")
    sp.add_argument("--data", required=True, metavar="DATAFILE", help="the data device image (copied)")
    sp.add_argument("--names", metavar="JSON", help="volume names and sizes, as written by dump --names")
    sp.add_argument("--metadata-size", metavar="SIZE", help="metadata space (default: enough, >= 64M)")

    sp = add("import-docker", cmd_import_docker, "make a pool from a Docker devicemapper directory")
    sp.add_argument("docker_dir", metavar="DOCKER_DM_DIR",
                    help="e.g. /var/lib/docker/devicemapper (holds devicemapper/ and metadata/)")
    sp.add_argument("pool", metavar="POOL")

    sp = add("export", cmd_export, "copy a volume to a raw image file")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--sparse", action="store_true", help="keep unmapped ranges as holes")

    sp = add("import", cmd_import, "make a volume from a raw image (zero blocks not stored)")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--size", metavar="SIZE", help="virtual size (default: the image's size)")

    sp = add("delta", cmd_delta, "which block ranges differ between two volumes (thin_delta)")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("left", metavar="A")
    sp.add_argument("right", metavar="B")
    sp.add_argument("--json", action="store_true")

    sp = add("check", cmd_check, "verify the metadata (exit 1 if problems are found); a clean "
                 "check of an unmounted pool clears its needs-check flag, nothing else changes")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("--json", action="store_true")

    sp = add("repair", cmd_repair, "rebuild the metadata from its newest intact commit")
    sp.add_argument("pool", metavar="POOL")

    sp = add("set", cmd_set, "change a pool's autoextend, low-water and zero-detection settings "
             "(mounted or not)")
    sp.add_argument("pool", metavar="POOL")
    add_space_options(sp, changing=True)
    sp.add_argument("--zero-detection", choices=["on", "off"],
                    help="on: writes of zeros into unmapped blocks store nothing and blocks left "
                    "all zeros are unmapped; off: zeros are data (dm-thin)")

    sp = add("extend", cmd_extend, "grow the pool's data and/or metadata space")
    sp.add_argument("pool", metavar="POOL")
    sp.add_argument("--data-size", metavar="SIZE")
    sp.add_argument("--metadata-size", metavar="SIZE")
    return p


INIT_EPILOG = """\
storage modes:
  loop (default)  data in a sparse file POOL/data: space is promised, not reserved,
                  so the host filesystem can fill up before the pool does ("Data
                  Space Available" is capped by it); freed blocks are given back
                  to the host; data goes through the host page cache.
  direct          data on a block device (--data-device /dev/...; refused if it is
                  in use, or holds a filesystem unless --force; --data-size may
                  take less than the whole device) or in a file allocated in full
                  at init (--preallocate; refused if the host lacks the space).
                  O_DIRECT I/O: no host page cache; space reserved up front.

autoextend (loop mode, LVM's thin_pool_autoextend_threshold/_percent):
  --autoextend-threshold 80 --autoextend-percent 20 grows the data space by 20%
  whenever 80% of it is in use, up to --max-data-size (default: no limit but
  the host's free space).  `fusepool set POOL ...` changes these later.

low water (dm-thin's low_water_mark, what dmeventd acts on):
  --low-water-mark BLOCKS logs when free data blocks drop below BLOCKS, and
  --on-low-water CMD runs CMD (with /bin/sh) once per crossing, without
  blocking I/O.  CMD sees FUSEPOOL_POOL, FUSEPOOL_FREE_BLOCKS,
  FUSEPOOL_USED_BLOCKS, FUSEPOOL_TOTAL_BLOCKS, FUSEPOOL_BLOCK_SIZE and
  FUSEPOOL_LOW_WATER_MARK; e.g. --on-low-water 'fusepool extend "$FUSEPOOL_POOL"
  --data-size 200G'.
"""


def add_space_options(sp, changing: bool = False) -> None:
    """The autoextend and low-water options of init and set."""
    sp.add_argument("--autoextend-threshold", metavar="PERCENT",
                    help="grow the data space when this much of it is in use (1-100; 100 = off"
                    + ("" if changing else ", the default") + "; loop mode only)")
    sp.add_argument("--autoextend-percent", metavar="PERCENT",
                    help="grow by this percent of the current data size"
                    + ("" if changing else " (default 20)"))
    sp.add_argument("--max-data-size", metavar="SIZE",
                    help="never autoextend past this size" + (" (0: no limit)" if changing else ""))
    sp.add_argument("--low-water-mark", type=non_negative_int, metavar="BLOCKS",
                    help="free data blocks below which the low-water event fires (0 = off)")
    sp.add_argument("--on-low-water", metavar="CMD",
                    help="shell command run once per low-water crossing"
                    + (" ('' removes it)" if changing else ""))


def _checked_number(convert, kind: str, ok, rule: str, pattern: str):
    """An argparse type: ``convert`` the text, then require ``ok(value)`` (else say ``rule``).

    The text must match ``pattern`` first (ASCII digits, an optional minus, a decimal
    point for floats): float() and int() would also take ' 12', '1_0', '١٢', 'inf' and
    'nan', and a non-finite float would end up in pool.json as non-JSON ``Infinity``.
    """
    syntax = re.compile(pattern, re.ASCII)

    def parse(text: str):
        if len(text) > 100 or not syntax.fullmatch(text):
            raise argparse.ArgumentTypeError(f"not {kind}: {text[:100]!r}")
        value = convert(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}: {text!r}")
        return value

    return parse


_FLOAT = r"-?[0-9]+(?:\.[0-9]+)?"
positive_float = _checked_number(float, "a number", lambda v: v > 0, "must be positive", _FLOAT)
non_negative_float = _checked_number(float, "a number", lambda v: v >= 0, "must not be negative",
                                     _FLOAT)
_whole_number = _checked_number(int, "a whole number", lambda v: v >= 0, "must not be negative",
                                r"-?[0-9]+")


def non_negative_int(text: str) -> int:
    """A block count: 40-bit (data block numbers share a u64 with a 24-bit time)."""
    value = _whole_number(text)
    if value >= 1 << 40:
        raise argparse.ArgumentTypeError(f"more blocks than a pool can have (2^40): {text[:60]!r}")
    return value


# Commands that usually just talk to a running daemon; logging is set up for them only
# when they fall back to opening the pool themselves (see pool_call).
LIGHT_COMMANDS = {"create", "snapshot", "remove", "resize", "list", "info", "inspect", "map",
                  "discard", "extend", "set", "umount"}


def main(argv: list[str] | None = None) -> int:
    # Second line of defence for "every file of a pool is owner-only": whatever a
    # code path forgets to chmod is created without group/other bits (a stricter
    # umask is kept).
    os.umask(os.umask(0o077) | 0o077)
    argv = sys.argv[1:] if argv is None else argv
    if "resize" in argv and any(re.match(r"^-\d", x) for x in argv[argv.index("resize") + 1 :]):
        # argparse would take "-1G" for an option and print a confusing message
        print("fusepool: error: volumes cannot shrink: resize takes SIZE or +SIZE", file=sys.stderr)
        return 2
    command = next((x for x in argv if not x.startswith("-")), None)
    parser = build_parser(only=command)
    if command not in parser.commands:
        parser = build_parser()  # no command, or an unknown one: argparse lists them all
    args = parser.parse_args(argv)
    if args.command == "mount" or args.debug or args.command not in LIGHT_COMMANDS:
        import logging  # (not for light commands: it costs start-up time)

        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s"
                            if args.command == "mount" else "fusepool: %(message)s")
        if args.command != "mount":
            logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed stdout shows here, not in the interpreter's last flush
    except BrokenPipeError:
        if not stdout_closed():
            print("fusepool: error: broken pipe", file=sys.stderr)
            return 1
        return die_of_sigpipe()
    except PoolError as exc:
        print(f"fusepool: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"fusepool: error: {exc.strerror or exc}"
              + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    return status or 0


def stdout_closed() -> bool:
    """True when nothing reads our stdout any more (the reader of a pipe is gone)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def die_of_sigpipe() -> int:
    """End as coreutils do when their reader goes (``seq 100000 | head -1``): silently,
    killed by SIGPIPE, so a shell sees status 141.

    Python ignores SIGPIPE and raises BrokenPipeError instead; stdout goes to
    /dev/null first so that the interpreter's final flush cannot complain either.
    """
    import signal

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.stderr.flush()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE  # (not reached: the signal ends the process)
