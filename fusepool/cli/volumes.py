"""Handlers of the volume commands: create, snapshot, remove, resize, list, inspect, map, discard."""

import os

from fusepool.cli import dispatch
from fusepool.cli.output import emit_json
from fusepool.errors import PoolError, UsageError
from fusepool.units import human_size, parse_size


def fsync_path(path: str) -> None:
    # Commands that must see every write made so far (snapshot, discard) flush the
    # kernel's cache first, as LVM suspends (flushes) an origin before snapshotting it.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(a) -> None:
    size = parse_size(a.size) if a.size is not None else None
    dev = dispatch.call(a.pool, "create", {"name": a.name, "size": size})
    print(f"created volume {dev['name']} (device id {dev['dev_id']}, {human_size(dev['size'])})")


def snapshot(a) -> None:
    path = dispatch.cached_volume(a.pool, a.origin)
    if path is not None:
        fsync_path(path)
    dev = dispatch.call(a.pool, "snapshot", {"origin": a.origin, "name": a.name})
    print(f"created snapshot {dev['name']} of {a.origin} (device id {dev['dev_id']})")


def remove(a) -> None:
    res = dispatch.call(a.pool, "remove", {"name": a.name})
    note = " (deferred: still open; freed at last close)" if res["deferred"] else ""
    print(f"removed volume {a.name}{note}")


def resize(a) -> None:
    text = a.size
    relative = text.startswith("+")
    if text.startswith("-"):
        raise UsageError("volumes cannot shrink")
    size = parse_size(text.removeprefix("+"))  # "++1M" stays invalid
    path = dispatch.cached_volume(a.pool, a.name)
    if path is not None:  # the kernel owns the size of a cached volume: resize through it
        current = os.stat(path).st_size
        size = current + size if relative else size
        if size < current:
            raise UsageError(f"cannot shrink volume {a.name!r} from {current} to {size} bytes: "
                             "volumes only grow")
        try:
            os.truncate(path, size)
        except OSError as exc:
            raise PoolError(f"cannot resize volume {a.name!r} to {size} bytes: {exc.strerror}") from None
        print(f"volume {a.name} is now {size} bytes ({human_size(size)})")
        return
    dev = dispatch.call(a.pool, "resize", {"name": a.name, "size": size, "relative": relative})
    print(f"volume {dev['name']} is now {dev['size']} bytes ({human_size(dev['size'])})")


def list_(a) -> None:
    from fusepool.cli.volume_tables import print_thin_ls, print_volumes

    rows = dispatch.call(a.pool, "thin_ls" if a.format == "thin_ls" else "list")
    if a.json:
        return emit_json(rows)
    (print_thin_ls if a.format == "thin_ls" else print_volumes)(rows)


def inspect(a) -> None:
    emit_json(dispatch.call(a.pool, "inspect", {"name": a.name}))


def map_(a) -> None:
    from fusepool.cli.volume_tables import print_extents

    extents = dispatch.call(a.pool, "map", {"name": a.name})
    if a.json:
        return emit_json(extents)
    print_extents(extents)


def discard(a) -> None:
    path, cached = dispatch.mounted_volume(a.pool, a.name)
    if cached:
        fsync_path(path)  # or a cached write would land after the discard
    res = dispatch.call(a.pool, "discard", {"name": a.name, "offset": parse_size(a.offset),
                                            "length": parse_size(a.length)})
    if path is not None:  # pages the kernel still caches would show the old bytes
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    print(f"unmapped {res['unmapped_blocks']} block(s) of {a.name}")
