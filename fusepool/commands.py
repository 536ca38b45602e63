"""Pool commands shared by the CLI (pool opened directly) and the mount daemon.

Each command takes an open :class:`Pool` and plain JSON-able arguments and
returns a JSON-able result, so the same code serves ``fusepool create POOL X``
whether the pool is mounted (the request travels over the control socket) or
not.
"""

from fusepool.control import Streamed
from fusepool.engine import Pool, walks
from fusepool.errors import UsageError


def run(pool: Pool, op: str, args: dict):
    handler = COMMANDS.get(op)
    if handler is None:
        raise UsageError(f"unknown command {op!r}")
    return handler(pool, **args)


def _create(pool, name, size=None):
    dev = pool.create_volume(name, size)
    return pool.describe(dev, usage=False)


def _snapshot(pool, origin, name):
    dev = pool.snapshot(origin, name)
    return pool.describe(dev, usage=False)


def _remove(pool, name):
    dev_id = pool.volume(name).dev_id
    deferred = pool.remove(name)
    return {"name": name, "dev_id": dev_id, "deferred": deferred}


def _resize(pool, name, size, relative=False):
    dev = pool.volume(name)
    new_size = dev.size + size if relative else size
    pool.resize(dev.dev_id, new_size)
    return pool.describe(dev, usage=False)


def _list(pool):
    return walks.describe_all(pool, pool.volumes())


def _info(pool):
    return pool.stats()


def _inspect(pool, name):
    dev = pool.volume(name)
    return {
        "Name": "fusepool",
        "Data": {"DeviceId": str(dev.dev_id), "DeviceName": dev.name, "DeviceSize": str(dev.size)},
        "Fusepool": walks.describe_all(pool, [dev])[0] | {"block_size": pool.block_size, "pool": pool.path},
    }


def _map(pool, name):
    dev = pool.volume(name)
    bs = pool.block_size
    return [e | {"offset": e["virtual_block"] * bs, "length": e["blocks"] * bs}
            for e in walks.extents(pool, dev)]


def _discard(pool, name, offset, length):
    dev = pool.volume(name)
    blocks = pool.discard(dev.dev_id, offset, length)
    pool.commit()
    return {"name": name, "unmapped_blocks": blocks}


def _extend(pool, data_size=None, metadata_size=None):
    pool.extend(data_size, metadata_size)
    return pool.stats()


def _set(pool, **settings):
    pool.configure(**settings)
    return pool.stats()


def _dump(pool):
    """thin_dump XML, streamed: the IR is taken now, its text made piece by piece."""
    from fusepool.interop.thin_xml import dump, xml_pieces

    ir, names = dump(pool)
    return Streamed({"names": {str(k): v for k, v in names.items()}}, xml_pieces(ir))


def _thin_ls(pool):
    rows = []
    devices = [d for d in sorted(pool.devices.values(), key=lambda d: d.dev_id) if not d.deleted]
    usage = walks.usage(pool, devices)
    for dev in devices:
        exclusive, shared = usage[dev.dev_id]
        rows.append({"dev_id": dev.dev_id, "name": dev.name, "mapped_blocks": dev.mapped_blocks,
                     "exclusive_blocks": exclusive, "shared_blocks": shared,
                     "transaction": dev.transaction, "creation_time": dev.creation_time,
                     "snap_time": dev.snap_time, "block_size": pool.block_size})
    return rows


def _delta(pool, left, right):
    a, b = pool.volume(left), pool.volume(right)
    sb = pool.store.superblock
    return {"left": a.dev_id, "right": b.dev_id,
            "header": {"uuid": "", "time": pool.time, "transaction": pool.transaction_id,
                       "data_block_size": pool.block_size // 512, "nr_data_blocks": pool.nr_blocks,
                       "uuid_full": sb.uuid},
            "ranges": walks.delta(pool, a, b)}


COMMANDS = {
    "create": _create, "snapshot": _snapshot, "remove": _remove, "resize": _resize,
    "list": _list, "info": _info, "inspect": _inspect, "map": _map, "discard": _discard,
    "extend": _extend, "set": _set, "dump": _dump, "thin_ls": _thin_ls, "delta": _delta,
}
