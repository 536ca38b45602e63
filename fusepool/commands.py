"""Pool commands shared by the CLI (pool opened directly) and the mount daemon.

Each command takes an open :class:`Pool` and plain JSON-able arguments and
returns a JSON-able result, so the same code serves ``fusepool create POOL X``
whether the pool is mounted (the request travels over the control socket) or
not.  ``changed`` tells the daemon which names/volumes the kernel must forget.
"""

from dataclasses import dataclass, field

from fusepool.errors import UsageError
from fusepool.pool import Pool


@dataclass
class Changes:
    """What a command changed, for the FUSE layer's cache invalidation."""

    names: list[str] = field(default_factory=list)  # directory entries added/removed
    dev_ids: list[int] = field(default_factory=list)  # volumes whose size/content changed


def run(pool: Pool, op: str, args: dict, changes: Changes | None = None):
    handler = COMMANDS.get(op)
    if handler is None:
        raise UsageError(f"unknown command {op!r}")
    return handler(pool, changes or Changes(), **args)


def _create(pool, changes, name, size=None):
    dev = pool.create_volume(name, size)
    changes.names.append(name)
    return pool.describe(dev, usage=False)


def _snapshot(pool, changes, origin, name):
    dev = pool.snapshot(origin, name)
    changes.names.append(name)
    return pool.describe(dev, usage=False)


def _remove(pool, changes, name):
    dev_id = pool.volume(name).dev_id
    deferred = pool.remove(name)
    changes.names.append(name)
    return {"name": name, "dev_id": dev_id, "deferred": deferred}


def _resize(pool, changes, name, size, relative=False):
    dev = pool.volume(name)
    new_size = dev.size + size if relative else size
    pool.resize(name, new_size)
    changes.dev_ids.append(dev.dev_id)
    return pool.describe(dev, usage=False)


def _list(pool, changes):
    return [pool.describe(dev) for dev in pool.volumes()]


def _info(pool, changes):
    return pool.stats()


def _inspect(pool, changes, name):
    dev = pool.volume(name)
    return {
        "Name": "fusepool",
        "Data": {"DeviceId": str(dev.dev_id), "DeviceName": dev.name, "DeviceSize": str(dev.size)},
        "Fusepool": pool.describe(dev) | {"block_size": pool.block_size, "pool": pool.path},
    }


def _map(pool, changes, name):
    dev = pool.volume(name)
    bs = pool.block_size
    return [e | {"offset": e["virtual_block"] * bs, "length": e["blocks"] * bs}
            for e in pool.extents(dev)]


def _discard(pool, changes, name, offset, length):
    dev = pool.volume(name)
    blocks = pool.discard(dev.dev_id, offset, length)
    pool.commit()
    changes.dev_ids.append(dev.dev_id)
    return {"name": name, "unmapped_blocks": blocks}


def _extend(pool, changes, data_size=None, metadata_size=None):
    pool.extend(data_size, metadata_size)
    return pool.stats()


def _dump(pool, changes):
    from fusepool.interop.thin_xml import dump, write_xml

    import io

    ir, names = dump(pool)
    out = io.StringIO()
    write_xml(ir, out)
    return {"xml": out.getvalue(), "names": {str(k): v for k, v in names.items()}}


def _thin_ls(pool, changes):
    rows = []
    for dev in sorted(pool.devices.values(), key=lambda d: d.dev_id):
        if dev.deleted:
            continue
        exclusive, shared = pool.device_usage(dev)
        rows.append({"dev_id": dev.dev_id, "name": dev.name, "mapped_blocks": dev.mapped_blocks,
                     "exclusive_blocks": exclusive, "shared_blocks": shared,
                     "transaction": dev.transaction, "creation_time": dev.creation_time,
                     "snap_time": dev.snap_time, "block_size": pool.block_size})
    return rows


def _delta(pool, changes, left, right):
    from fusepool.interop.images import delta

    a, b = pool.volume(left), pool.volume(right)
    sb = pool.store.superblock
    return {"left": a.dev_id, "right": b.dev_id,
            "header": {"uuid": "", "time": pool.time, "transaction": pool.transaction_id,
                       "data_block_size": pool.block_size // 512, "nr_data_blocks": pool.nr_blocks,
                       "uuid_full": sb.uuid},
            "ranges": delta([(v, d) for v, d, _ in pool.mappings(a)],
                            [(v, d) for v, d, _ in pool.mappings(b)])}


COMMANDS = {
    "create": _create, "snapshot": _snapshot, "remove": _remove, "resize": _resize,
    "list": _list, "info": _info, "inspect": _inspect, "map": _map, "discard": _discard,
    "extend": _extend, "dump": _dump, "thin_ls": _thin_ls, "delta": _delta,
}
