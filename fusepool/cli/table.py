"""The subcommands, as data: name, help, arguments and handler of each.

:mod:`fusepool.cli.parser` builds argparse parsers from this table (only the
sub-parser of the command being run, for start-up time), and the CLI contract
test (tests/test_cli.py) iterates over it, so a command or an option added here
is parsed, documented and covered without further wiring.

A handler is named ``"module:function"`` inside :mod:`fusepool.cli` and imported
only when its command runs.  Two option groups are shared with their handlers:

- ``MOUNT_OPTIONS``: options of ``mount`` that the background mount passes on
  to its daemon and that reach :func:`fusepool.mount.serve` as keywords;
- ``space_options()``: the pool settings ``init`` and ``set`` both take; their
  given values reach ``Pool.create`` / ``Pool.configure`` as keywords
  (``SET_OPTIONS``: all that ``set`` changes).

Adding either kind of option is one line here (and its meaning in the engine).
"""

import argparse
import operator

from fusepool.cli.argtypes import non_negative_float, non_negative_int, positive_float


class Arg:
    """One ``add_argument`` call.

    ``convert``: applied to the given value by the handler (so its errors are
    ``fusepool: error:`` lines); ``exclusive``: the name of the mutually exclusive
    group the option belongs to.  For ``MOUNT_OPTIONS`` only: ``forward``, passed on
    to the daemon's command line and to :func:`fusepool.mount.serve`, as keyword
    ``keyword`` (default: the option's dest) with ``convert`` applied.
    """

    __slots__ = ("flags", "options", "forward", "convert", "exclusive", "keyword")

    def __init__(self, *flags: str, forward: bool = False, convert=None, exclusive: str | None = None,
                 keyword: str | None = None, **options):
        self.flags, self.options, self.forward, self.convert = flags, options, forward, convert
        self.exclusive, self.keyword = exclusive, keyword

    @property
    def dest(self) -> str:
        if "dest" in self.options:
            return self.options["dest"]
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return long.lstrip("-").replace("-", "_")

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith("-")


class Command:
    """A subcommand.  ``light``: it usually just talks to a running daemon, so logging is
    set up for it only when it opens the pool itself (see :func:`fusepool.cli.main`)."""

    __slots__ = ("name", "help", "handler", "args", "light", "epilog")

    def __init__(self, name: str, help: str, handler: str, args, light: bool = False,
                 epilog: str | None = None):
        self.name, self.help, self.handler, self.args = name, help, handler, tuple(args)
        self.light, self.epilog = light, epilog


def _parse_size(text: str) -> int:
    from fusepool.units import parse_size

    return parse_size(text)


def space_options(changing: bool = False) -> list[Arg]:
    """The autoextend and low-water options of init and set (``changing``: set's help)."""
    return [
        Arg("--autoextend-threshold", metavar="PERCENT",
            help="grow the data space when this much of it is in use (1-100; 100 = off"
            + ("" if changing else ", the default") + "; loop mode only)"),
        Arg("--autoextend-percent", metavar="PERCENT",
            help="grow by this percent of the current data size" + ("" if changing else " (default 20)")),
        Arg("--max-data-size", metavar="SIZE", convert=_parse_size,
            help="never autoextend past this size" + (" (0: no limit)" if changing else "")),
        Arg("--low-water-mark", type=non_negative_int, metavar="BLOCKS",
            help="free data blocks below which the low-water event fires (0 = off)"),
        Arg("--on-low-water", metavar="CMD",
            help="shell command run once per low-water crossing" + (" ('' removes it)" if changing else "")),
    ]


# What `set` changes (the handler's "nothing to set" names them all, in this order).
SET_OPTIONS = space_options(changing=True) + [
    Arg("--zero-detection", choices=["on", "off"], convert=lambda value: value == "on",
        help="on: writes of zeros into unmapped blocks store nothing and blocks left "
        "all zeros are unmapped; off: zeros are data (dm-thin)"),
]

POOL = Arg("pool", metavar="POOL")
NAME = Arg("name", metavar="NAME")
JSON = Arg("--json", action="store_true")

MOUNT_OPTIONS = [
    Arg("--commit-period", type=positive_float, default=1.0, metavar="SECONDS", forward=True,
        help="commit metadata at least this often when changed (default 1)"),
    Arg("--allow-other", action="store_true", forward=True, help="let other users access the mount"),
    Arg("--no-space-timeout", type=non_negative_float, metavar="SECONDS", forward=True,
        help="override the pool's out-of-space wait for this mount"),
    Arg("--write-through", action="store_true", forward=True, exclusive="cache",
        keyword="writeback_cache", convert=operator.not_,
        help="send every write to the daemon before it returns, so that errors "
        "(out of space) show at write(); the default is the kernel's writeback "
        "cache, as for a kernel thin volume's block device: writes return once "
        "cached, errors show at fsync or close (see README)"),
    Arg("--writeback-cache", action="store_true", exclusive="cache",
        help="the default (kept for compatibility; does nothing)"),
    Arg("--nonempty", action="store_true", forward=True,
        help="mount even if MOUNTPOINT holds files (the mount hides them)"),
    Arg("--nbd", action="append", forward=True, metavar="ADDRESS",
        help="also serve every volume over NBD at ADDRESS (as `serve --nbd`; may be repeated)"),
    Arg("--nbd-read-only", action="store_true", forward=True, help="NBD exports are read-only"),
]

NBD_HELP = ("serve at ADDRESS: unix:PATH (a socket only you can use) or tcp:[HOST:]PORT (HOST "
            "127.0.0.1 unless given; NBD has no authentication: anyone who can connect reads "
            "and writes every volume); may be repeated")

# Options of `serve` that the background daemon is given and that reach
# fusepool.mount.serve_nbd as keywords.
SERVE_OPTIONS = [
    Arg("--nbd", action="append", required=True, forward=True, metavar="ADDRESS", help=NBD_HELP),
    Arg("--read-only", action="store_true", forward=True, help="every export is read-only"),
    Arg("--commit-period", type=positive_float, default=1.0, metavar="SECONDS", forward=True,
        help="commit metadata at least this often when changed (default 1)"),
    Arg("--no-space-timeout", type=non_negative_float, metavar="SECONDS", forward=True,
        help="override the pool's out-of-space wait while serving"),
]

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

COMMANDS = [
    Command("init", "create a new pool directory", "pools:init", epilog=INIT_EPILOG, args=[
        POOL,
        Arg("--data-size", metavar="SIZE",
            help="data space (default 100G; with --data-device: the whole device)"),
        Arg("--metadata-size", default="2G", metavar="SIZE", help="metadata space (default 2G)"),
        Arg("--block-size", default="64K", metavar="SIZE",
            help="pool block size: a multiple of 64K up to 1G (default 64K)"),
        Arg("--base-size", default="10G", metavar="SIZE", help="default size of new volumes (default 10G)"),
        Arg("--min-free-space", default="10%", metavar="PERCENT",
            help="refuse new volumes/snapshots below this free space (default 10%%)"),
        Arg("--skip-block-zeroing", action="store_true",
            help="do not zero new blocks on partial writes (stale data may show)"),
        Arg("--zero-detection", action="store_true",
            help="store nothing for writes of zeros into unmapped blocks and unmap blocks "
            "that writes leave all zeros (qemu's detect-zeroes=unmap; default off: zeros "
            "are provisioned like any data, as dm-thin does)"),
        Arg("--no-space-timeout", type=non_negative_float, default=0.0, metavar="SECONDS",
            help="out of data space: let allocating writes wait this long for space "
            "before failing with ENOSPC (dm-thin's queue mode; default 0: fail at once)"),
        Arg("--mode", choices=["loop", "direct"],
            help="loop: sparse data file (default); direct: block device or preallocated file, O_DIRECT"),
        Arg("--data-device", metavar="PATH",
            help="direct mode on this block device (the pool directory keeps the metadata)"),
        Arg("--preallocate", action="store_true", help="direct mode on POOL/data, allocated in full now"),
        Arg("--force", action="store_true",
            help="use a --data-device that holds a filesystem or partition table"),
        *space_options()]),
    Command("mount", "mount a pool: each volume becomes MOUNTPOINT/NAME", "daemon:mount", args=[
        POOL, Arg("mountpoint", metavar="MOUNTPOINT"),
        Arg("--foreground", action="store_true", help="serve in this process"),
        *MOUNT_OPTIONS,
        Arg("--ready-fd", type=int, help=argparse.SUPPRESS)]),
    Command("umount", "commit, unmount and wait for the daemon to exit", "daemon:umount", light=True,
            args=[Arg("mountpoint", metavar="MOUNTPOINT"),
                  Arg("--force", action="store_true", help="unmount even with volumes open"),
                  Arg("--timeout", type=positive_float, default=60.0, metavar="SECONDS")]),
    Command("serve", "serve every volume over NBD (one export per volume, named by it), "
            "without a FUSE mount", "serving:serve", args=[
                POOL, *SERVE_OPTIONS,
                Arg("--foreground", action="store_true", help="serve in this process"),
                Arg("--ready-fd", type=int, help=argparse.SUPPRESS)]),
    Command("stop", "stop the pool's daemon (mount or serve): commit, stop serving, wait for "
            "it to exit", "serving:stop", light=True, args=[
                POOL, Arg("--force", action="store_true", help="stop even with volumes in use"),
                Arg("--timeout", type=positive_float, default=60.0, metavar="SECONDS")]),
    Command("create", "create a thin volume", "volumes:create", light=True, args=[
        POOL, NAME, Arg("--size", metavar="SIZE", help="virtual size (default: the pool's base size)")]),
    Command("snapshot", "create a writable snapshot of a volume", "volumes:snapshot", light=True,
            args=[POOL, Arg("origin", metavar="ORIGIN"), NAME]),
    Command("remove", "remove a volume (deferred while it is open)", "volumes:remove", light=True,
            args=[POOL, NAME]),
    Command("resize", "grow a volume to SIZE or by +SIZE", "volumes:resize", light=True,
            args=[POOL, NAME, Arg("size", metavar="SIZE|+SIZE")]),
    Command("list", "list volumes", "volumes:list_", light=True, args=[
        POOL, JSON,
        Arg("--format", choices=["table", "thin_ls"], default="table",
            help="thin_ls: thin_ls's columns (DEV MAPPED_BLOCKS EXCLUSIVE_BLOCKS ...)")]),
    Command("info", "pool statistics, as `docker info` prints them", "pools:info", light=True,
            args=[POOL, Arg("--json", action="store_true", help="exact byte counts")]),
    Command("inspect", "one volume, as Docker's GraphDriver JSON", "volumes:inspect", light=True,
            args=[POOL, NAME]),
    Command("map", "mapped extents of a volume, shared or exclusive", "volumes:map_", light=True,
            args=[POOL, NAME, JSON]),
    Command("discard", "unmap the whole blocks inside a byte range", "volumes:discard", light=True,
            args=[POOL, NAME, Arg("offset", metavar="OFFSET"), Arg("length", metavar="LENGTH")]),
    Command("dump", "write the pool's metadata as thin_dump XML", "images:dump", args=[
        POOL,
        Arg("-o", "--output", metavar="FILE", help="write to FILE instead of stdout"),
        Arg("--names", metavar="FILE", help="also write volume names and sizes (JSON) to FILE")]),
    Command("restore", "make a new pool from thin_dump XML and a data image", "images:restore", args=[
        POOL,
        Arg("-i", "--input", required=True, metavar="FILE", help="thin_dump XML"),
        Arg("--data", required=True, metavar="DATAFILE", help="the data device image (copied)"),
        Arg("--names", metavar="JSON", help="volume names and sizes, as written by dump --names"),
        Arg("--metadata-size", metavar="SIZE", help="metadata space (default: enough, >= 64M)")]),
    Command("import-docker", "make a pool from a Docker devicemapper directory", "images:import_docker",
            args=[Arg("docker_dir", metavar="DOCKER_DM_DIR",
                      help="e.g. /var/lib/docker/devicemapper (holds devicemapper/ and metadata/)"),
                  POOL]),
    Command("export", "copy a volume to a raw image file", "images:export", args=[
        POOL, NAME, Arg("file", metavar="FILE"),
        Arg("--sparse", action="store_true", help="keep unmapped ranges as holes")]),
    Command("import", "make a volume from a raw image (zero blocks not stored)", "images:import_",
            args=[POOL, NAME, Arg("file", metavar="FILE"),
                  Arg("--size", metavar="SIZE", help="virtual size (default: the image's size)")]),
    Command("delta", "which block ranges differ between two volumes (thin_delta)", "images:delta",
            args=[POOL, Arg("left", metavar="A"), Arg("right", metavar="B"), JSON]),
    Command("check", "verify the metadata (exit 1 if problems are found); a clean check of an "
            "unmounted pool clears its needs-check flag, nothing else changes", "pools:check",
            args=[POOL, JSON]),
    Command("repair", "rebuild the metadata from its newest intact commit", "pools:repair", args=[POOL]),
    Command("set", "change a pool's autoextend, low-water and zero-detection settings "
            "(mounted or not)", "pools:set_", light=True, args=[POOL, *SET_OPTIONS]),
    Command("extend", "grow the pool's data and/or metadata space", "pools:extend", light=True, args=[
        POOL, Arg("--data-size", metavar="SIZE"), Arg("--metadata-size", metavar="SIZE")]),
]

BY_NAME = {c.name: c for c in COMMANDS}
