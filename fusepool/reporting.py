"""Reporting on a mounted pool without stalling it: walk a held commit in this process.

The bulk reporting commands walk every mapping (see fusepool.engine.view for
why they do not run in the mount daemon).  Online, the CLI asks the daemon to
commit and hold that commit (``reserve_metadata_snap``), reads it from the
metadata file, runs the same command code as offline on it, and closes the
connection, which releases the hold.  The daemon spends one commit and a few
microseconds on it, whatever the size of the pool.
"""

from fusepool import commands, control
from fusepool.check import Report, check_pool
from fusepool.engine.view import CommittedView
from fusepool.metadata.format import Superblock


def run_on_snapshot(pool_dir: str, op: str, args: dict, output=None, timeout: float = 120.0):
    """Run reporting command ``op`` on a commit the daemon holds; its result.

    Raises what :func:`fusepool.control.request` raises when no daemon
    listens (``FileNotFoundError``/``ConnectionRefusedError``).
    """
    with control.held(pool_dir, "reserve_metadata_snap", timeout=timeout) as snap:
        if snap.get("transaction") is None:  # a failed pool: its daemon walks its memory
            return control.request(pool_dir, op, args, timeout=timeout, output=output)
        view = CommittedView.load(pool_dir, snap["transaction"], bytes.fromhex(snap["superblock"]),
                                  {int(k): v for k, v in snap.get("open_counts", {}).items()})
        result = commands.run(view, op, args)
        if isinstance(result, control.Streamed):
            for piece in result.chunks:
                output.write(piece.encode() if isinstance(piece, str) else piece)
            result = result.result
        return result


def check_on_snapshot(pool_dir: str, progress=None, timeout: float = 120.0) -> Report | dict:
    """``fusepool check`` of a mounted pool: the held commit and the journal on top of it.

    Returns a Report, or the daemon's own report (a dict) for a failed pool.
    """
    with control.held(pool_dir, "reserve_metadata_snap", timeout=timeout) as snap:
        txn = snap.get("transaction")
        if txn is None:
            return control.request(pool_dir, "check", timeout=timeout)
        superblock = Superblock.unpack(bytes.fromhex(snap["superblock"]), txn % 2)
        return check_pool(pool_dir, progress, superblock=superblock)
