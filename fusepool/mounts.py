"""What the kernel says is mounted: /proc/self/mountinfo, and lazy unmounting.

`fusepool umount` decides "is this a fusepool mount, and of which pool" from
here and from the daemon's own answer, never from a file in the directory (a
user can write one) and never by touching the mount (a stopped daemon would
hang the caller).  Kept free of trio and pyfuse3 so the CLI stays fast.
"""

import os
import re
import subprocess
from dataclasses import dataclass

FSTYPE = "fuse.fusepool"  # what the mount daemon's subtype=fusepool shows as


def unescape_mount_path(field: bytes) -> bytes:
    """A path as /proc/*/mounts and mountinfo write it: space, tab, newline, backslash in octal."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


@dataclass
class MountEntry:
    mountpoint: str
    fstype: str
    source: str  # for fusepool: the pool directory (the daemon's fsname)
    device: str  # major:minor


def mount_entries() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index(b"-", 6)
                entries.append(MountEntry(os.fsdecode(unescape_mount_path(fields[4])),
                                          fields[sep + 1].decode(errors="replace"),
                                          os.fsdecode(unescape_mount_path(fields[sep + 2])),
                                          fields[2].decode()))
            except (ValueError, IndexError):
                continue
    return entries


def find_mount(path: str) -> MountEntry | None:
    """The mount on top at ``path`` (absolute), or None; looks nothing up in the mount itself.

    Tried in order: the path as given, with its parent directory resolved, and
    (only if the path is itself a symlink, which lstat sees without entering
    any mount) its target.
    """
    candidates = [path, os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))]
    entries = mount_entries()
    for candidate in candidates:
        found = [e for e in entries if e.mountpoint == candidate]
        if found:
            return found[-1]
    if os.path.islink(path):
        target = os.path.realpath(path)
        found = [e for e in entries if e.mountpoint == target]
        if found:
            return found[-1]
    return None


def lazy_unmount(mountpoint: str) -> None:
    cmd = ["fusermount3", "-u", "-z", mountpoint] if os.getuid() else ["umount", "-l", mountpoint]
    subprocess.run(cmd, check=False, capture_output=True)
