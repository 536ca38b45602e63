"""Handlers of the volume commands: create, snapshot, remove, resize, list, inspect, map, discard."""

from fusepool.cli import dispatch
from fusepool.cli.output import emit_json
from fusepool.errors import UsageError
from fusepool.units import human_size, parse_size


def create(a) -> None:
    size = parse_size(a.size) if a.size is not None else None
    dev = dispatch.call(a.pool, "create", {"name": a.name, "size": size})
    print(f"created volume {dev['name']} (device id {dev['dev_id']}, {human_size(dev['size'])})")


def snapshot(a) -> None:
    with dispatch.connect(a.pool) as pool:
        dev = pool.snapshot(a.origin, a.name)
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
    with dispatch.connect(a.pool) as pool:
        dev = pool.resize(a.name, size, relative)
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
    offset, length = parse_size(a.offset), parse_size(a.length)
    with dispatch.connect(a.pool) as pool:
        res = pool.discard(a.name, offset, length)
    print(f"unmapped {res['unmapped_blocks']} block(s) of {a.name}")
