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

import json
import os
import shutil
import subprocess
import tempfile

from fusepool.errors import PoolError, UsageError
from fusepool.interop.thin_xml import read_xml, restore

DRIVER_FILES = {"deviceset-metadata", "transaction-metadata"}


def docker_names(metadata_dir: str) -> dict[int, dict]:
    """``{device_id: {"name", "size"}}`` from Docker's per-device JSON files."""
    names: dict[int, dict] = {}
    for entry in sorted(os.listdir(metadata_dir)):
        if entry in DRIVER_FILES or entry.startswith("."):
            continue
        path = os.path.join(metadata_dir, entry)
        try:
            with open(path) as f:
                info = json.load(f)
            dev_id, size = int(info["device_id"]), int(info["size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: not a Docker device metadata file ({exc})") from None
        if info.get("deleted"):
            continue
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
