"""Open a legacy Docker devicemapper store without root or the kernel's thin target.

Docker's loop-lvm keeps, under ``/var/lib/docker/devicemapper``::

    devicemapper/data        the thin pool's data device (sparse file)
    devicemapper/metadata    the thin pool's binary dm-thin metadata
    metadata/base            {"device_id": 0, "size": ..., "transaction_id": ..., ...}
    metadata/<id>            one JSON file per image layer or container (and <id>-init)
    metadata/deviceset-metadata, metadata/transaction-metadata   driver state

The binary metadata is read with ``thin_dump`` (thin-provisioning-tools); the
result goes through the same XML path as ``fusepool restore``, with volume
names taken from the JSON files' names and sizes from their ``size``.
"""

import os
import shutil
import subprocess
import tempfile

from fusepool.errors import PoolError, UsageError
from fusepool.interop.thin_xml import _is_int, load_json, read_xml, restore
from fusepool.metadata.format import MAX_DEV_ID, MAX_VOLUME_SIZE

DRIVER_FILES = {"deviceset-metadata", "transaction-metadata"}


def docker_names(metadata_dir: str) -> dict[int, dict]:
    """``{device_id: {"name", "size"}}`` from Docker's per-device JSON files.

    Each file is checked as Docker writes it (an object; ``device_id`` a 24-bit
    integer, ``size`` an integer byte count, ``deleted`` a boolean); two files
    naming one device are refused, naming both, rather than one silently winning.
    """
    names: dict[int, dict] = {}
    owner: dict[int, str] = {}  # device id -> the file that named it
    for entry in sorted(os.listdir(metadata_dir)):
        if entry in DRIVER_FILES or entry.startswith("."):
            continue
        path = os.path.join(metadata_dir, entry)
        info = load_json(path, "Docker device metadata file")

        def bad(what: str, path=path):
            return UsageError(f"{path}: not a Docker device metadata file ({what})")

        if not isinstance(info, dict):
            raise bad("not a JSON object")
        dev_id, size, deleted = info.get("device_id"), info.get("size"), info.get("deleted", False)
        if not _is_int(dev_id) or not 0 <= dev_id <= MAX_DEV_ID:
            raise bad(f"device_id {str(dev_id)[:40]} is not an integer from 0 to {MAX_DEV_ID}")
        if not _is_int(size) or not 0 <= size <= MAX_VOLUME_SIZE:
            raise bad(f"size {str(size)[:40]} is not a byte count from 0 to {MAX_VOLUME_SIZE}")
        if not isinstance(deleted, bool):
            raise bad(f"deleted {str(deleted)[:40]!r} is not true or false")
        if deleted:
            continue
        if dev_id in owner:
            raise UsageError(f"{os.path.join(metadata_dir, owner[dev_id])} and {path} both name "
                             f"device {dev_id}")
        owner[dev_id] = entry
        names[dev_id] = {"name": entry, "size": size}
    return names


def import_docker(docker_dir: str, pool_dir: str) -> list[str]:
    """Make a fusepool pool from a Docker devicemapper directory."""
    dm = os.path.join(docker_dir, "devicemapper")
    data, metadata = os.path.join(dm, "data"), os.path.join(dm, "metadata")
    meta_dir = os.path.join(docker_dir, "metadata")
    for path in (data, metadata, meta_dir):
        if not os.path.exists(path):
            raise UsageError(f"{docker_dir} is not a Docker devicemapper directory: {path} is missing")
    thin_dump = shutil.which("thin_dump")
    if thin_dump is None:
        raise PoolError("reading Docker's binary dm-thin metadata needs the thin_dump program: "
                        "install thin-provisioning-tools (apt-get install thin-provisioning-tools)")
    with tempfile.TemporaryFile("w+") as xml:
        proc = subprocess.run([thin_dump, metadata], stdout=xml, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise PoolError(f"thin_dump {metadata} failed: {last}")
        xml.seek(0)
        ir = read_xml(xml)
    names = docker_names(meta_dir)
    unknown = [d.dev_id for d in ir.devices if d.dev_id not in names]
    for dev_id in unknown:  # devices Docker no longer names (e.g. deleted): keep them by id
        names[dev_id] = {"name": f"device-{dev_id}"}
    return restore(ir, names, data, pool_dir)
