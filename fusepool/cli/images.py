"""Handlers of the commands that move data in and out of a pool: dump, restore,
import-docker, export, import, delta."""

import json
import os
import stat
import sys

from fusepool.cli import dispatch
from fusepool.cli.output import emit_json
from fusepool.errors import UsageError
from fusepool.units import parse_size


def dump(a) -> None:
    import contextlib

    from fusepool.outputs import check_output, open_output

    pool_dir = os.path.abspath(a.pool)
    dispatch.require_pool(pool_dir)
    for path in (a.output, a.names):  # refused before any work (never a symlink or a pool file)
        if path:
            check_output(path, pool_dir)
    with (open(open_output(a.output, pool_dir), "wb") if a.output
          else contextlib.nullcontext(sys.stdout.buffer)) as out:
        from fusepool.progress import counting

        with counting(out, "dump") as shown:  # progress on a terminal: a big dump takes a while
            res = dispatch.call(a.pool, "dump", output=shown)
    if a.names:
        with open(open_output(a.names, pool_dir), "w") as f:
            json.dump(res["names"], f, indent=2)
            f.write("\n")


def restore(a) -> None:
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


def import_docker(a) -> None:
    from fusepool.interop.docker import import_docker

    names = import_docker(a.docker_dir, a.pool)
    print(f"imported {len(names)} device(s) into {os.path.abspath(a.pool)}: {', '.join(names) or '-'}")


def delta(a) -> None:
    res = dispatch.call(a.pool, "delta", {"left": a.left, "right": a.right})
    if a.json:
        return emit_json(res["ranges"])
    from fusepool.interop.images import delta_xml

    print(delta_xml(res["ranges"], res["left"], res["right"], res["header"]))


def export(a) -> None:
    """Copy a consistent state of the volume: online a temporary snapshot (of every write
    made so far) read through the mount, offline the volume itself (the pool is locked here)."""
    from fusepool.interop.images import export_image
    from fusepool.outputs import check_output

    pool_dir = os.path.abspath(a.pool)
    with dispatch.connect(pool_dir) as pool:
        check_output(a.file, pool_dir)  # before the temporary snapshot (export_image checks again)
        with pool.frozen(a.name) as name:
            dev = pool.call("inspect", {"name": name})["Fusepool"]
            extents = pool.call("map", {"name": name})
            with pool.open_volume(dev) as volume:
                copied = export_image(extents, dev["size"], volume.read, a.file, a.sparse,
                                      pool_dir=pool_dir)
    print(f"exported {a.name} ({dev['size']} bytes, {copied} bytes of data) to {a.file}")


def import_(a) -> None:
    from fusepool.interop.images import import_image
    from fusepool.outputs import check_input

    pool_dir = os.path.abspath(a.pool)
    config = dispatch.require_pool(pool_dir)
    with dispatch.connect(pool_dir) as pool:
        check_input(a.file, pool_dir, pool.mountpoint)
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
        with pool.new_volume(a.name, size) as volume:  # removed again if the import fails
            stored = import_image(a.file, config.block_size, volume.write, size=image_size)
            volume.flush()
    print(f"imported {a.file} into {a.name} ({size} bytes, {stored} bytes stored)")
