"""Handlers of ``serve`` (the pool's volumes over NBD, no FUSE mount) and ``stop``."""

import os
import time

from fusepool import control
from fusepool.cli import dispatch
from fusepool.cli.daemon import forwarded_options, process_alive, refuse_if_served, start_daemon
from fusepool.cli.table import SERVE_OPTIONS
from fusepool.errors import DaemonTimeout, NotMounted, PoolError


def serve(a) -> None:
    pool_dir = os.path.abspath(a.pool)
    dispatch.require_pool(pool_dir)
    from fusepool.nbd import describe, parse_address

    # A usage error here, before a daemon is started; a relative unix path made absolute
    # here, where it was meant (the daemon runs in /).
    a.nbd = [describe(parse_address(address)) for address in a.nbd]
    refuse_if_served(pool_dir)
    if a.foreground:
        return run_foreground(pool_dir, a)
    start_daemon(pool_dir, ["serve", pool_dir, *forwarded_options(a, SERVE_OPTIONS)], a.debug)


def run_foreground(pool_dir: str, a) -> None:
    import logging

    from fusepool.mount import serve_nbd

    ready_file = os.fdopen(a.ready_fd, "w") if a.ready_fd is not None else None
    log = logging.getLogger("fusepool")

    def on_ready():
        log.info("serving %s over NBD (pid %d)", pool_dir, os.getpid())
        if ready_file:
            ready_file.write("ready\n")
            ready_file.close()

    options = {}
    for arg in SERVE_OPTIONS:
        if arg.forward:
            value = getattr(a, arg.dest)
            options[arg.keyword or arg.dest] = arg.convert(value) if arg.convert else value
    try:
        serve_nbd(pool_dir, on_ready=on_ready, **options)
    except PoolError as exc:
        if ready_file and not ready_file.closed:
            ready_file.write(f"error {exc.exit_status}: {exc}\n")
            ready_file.close()
        raise


def stop(a) -> None:
    """Ask the pool's daemon to stop (a mount is unmounted too) and wait until it has exited."""
    pool_dir = os.path.abspath(a.pool)
    dispatch.require_pool(pool_dir)
    deadline = time.monotonic() + a.timeout
    try:
        reply = control.request(pool_dir, "stop", {"force": a.force}, timeout=a.timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotMounted(f"no daemon serves pool {pool_dir}") from None
    except DaemonTimeout as exc:
        raise DaemonTimeout(f"{exc}; nothing was stopped") from None
    pid = reply["pid"]
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise PoolError(f"the daemon (pid {pid}) has not exited after {a.timeout:g} s")
        time.sleep(0.01)
