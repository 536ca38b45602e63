"""Handlers of the pool-wide commands: init, info, set, extend, check, repair."""

import os
import sys

from fusepool.cli import dispatch
from fusepool.cli.info_block import (
    describe_autoextend,
    describe_low_water,
    describe_zero_detection,
    format_info,
)
from fusepool.cli.output import emit_json
from fusepool.cli.table import SET_OPTIONS, space_options
from fusepool.errors import PoolError, UsageError
from fusepool.units import human_size, parse_percent, parse_size


def given_settings(a, options) -> dict:
    """The pool settings among ``options`` (``Arg``s of the table) that were given, converted."""
    settings = {}
    for arg in options:
        value = getattr(a, arg.dest)
        if value is not None:
            settings[arg.dest] = arg.convert(value) if arg.convert else value
    return settings


def init(a) -> None:
    from fusepool.engine import Pool

    block_size = parse_size(a.block_size)
    data_size = Pool.create(
        a.pool, data_size=parse_size(a.data_size) if a.data_size is not None else None,
        metadata_size=parse_size(a.metadata_size), block_size=block_size,
        base_size=parse_size(a.base_size), min_free_space=parse_percent(a.min_free_space),
        skip_block_zeroing=a.skip_block_zeroing, no_space_timeout=a.no_space_timeout,
        mode=a.mode, data_device=a.data_device, preallocate=a.preallocate, force=a.force,
        zero_detection=a.zero_detection, **given_settings(a, space_options()))
    config = dispatch.require_pool(a.pool)
    where = (f"on {config.data_device}" if config.data_device else
             "preallocated" if config.preallocated else "sparse")
    print(f"created pool {os.path.abspath(a.pool)} ({config.mode} mode, block size "
          f"{human_size(block_size)}, data {human_size(data_size)} {where})")


def set_(a) -> None:
    settings = given_settings(a, SET_OPTIONS)
    if not settings:
        flags = [arg.flags[0] for arg in SET_OPTIONS]
        raise UsageError(f"nothing to set: give {', '.join(flags[:-1])} and/or {flags[-1]}")
    st = dispatch.call(a.pool, "set", settings)
    print(f"autoextend: {describe_autoextend(st)}; low-water mark: {describe_low_water(st)}; "
          f"zero detection: {describe_zero_detection(st)}")


def info(a) -> None:
    with dispatch.connect(a.pool) as pool:
        st = pool.call("info")
        st["mounted"] = pool.mountpoint
        if isinstance(pool, dispatch.Online) and pool.status.get("nbd"):
            st["nbd"] = pool.status["nbd"]
    if a.json:
        return emit_json(st)
    print(format_info(st))


def extend(a) -> None:
    if a.data_size is None and a.metadata_size is None:
        raise UsageError("nothing to extend: give --data-size and/or --metadata-size")
    st = dispatch.call(a.pool, "extend", {
        "data_size": parse_size(a.data_size) if a.data_size is not None else None,
        "metadata_size": parse_size(a.metadata_size) if a.metadata_size is not None else None})
    print(f"data space {human_size(st['data_space_total'])}, "
          f"metadata space {human_size(st['metadata_space_total'])}")


def check(a) -> int:
    from fusepool.cli.check_report import print_report, progress_bar

    pool_dir = os.path.abspath(a.pool)

    def offline() -> dict:  # the pool's files read tolerantly, not Pool.open
        from fusepool.check import check_offline

        report = check_offline(pool_dir, progress_bar("checking")).to_json()
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        return report

    report = dispatch.call(pool_dir, "check", offline=offline)
    if a.json:
        emit_json(report)
    else:
        print_report(report, a.pool)
    return 0 if report["ok"] else 1


def repair(a) -> None:
    from fusepool.check import repair
    from fusepool.cli.check_report import progress_bar

    pool_dir = os.path.abspath(a.pool)
    with dispatch.connect(pool_dir) as pool:
        if pool.mountpoint:
            raise PoolError(f"pool {pool_dir} is mounted at {pool.mountpoint}: unmount it before repair")
        if isinstance(pool, dispatch.Online):
            raise PoolError(f"pool {pool_dir} is served over NBD: `fusepool stop {pool_dir}` "
                            "before repair")
    for line in repair(pool_dir, progress_bar("reading")):
        print(line)
