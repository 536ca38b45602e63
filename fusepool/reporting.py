"""Reporting on a mounted pool without stalling it: walk a held commit in this process.

The bulk reporting commands walk every mapping (see fusepool.engine.view for
why they do not run in the mount daemon).  Online, the CLI asks the daemon to
commit and hold that commit (``reserve_metadata_snap``), reads it from the
metadata file, runs the same command code as offline on it, and closes the
connection, which releases the hold.  The daemon spends one commit and a few
microseconds on it, whatever the size of the pool.
"""

from fusepool import commands, control
from fusepool.check import check_pool
from fusepool.engine.view import CommittedView
from fusepool.metadata.format import Superblock


def run_on_snapshot(pool_dir: str, op: str, args: dict, output=None, timeout: float = 120.0):
    """Run reporting command ``op`` (one of ``control.SNAPSHOT_OPS``) on a commit the
    daemon holds; its result (``check``: the report as JSON, with the journal on top).

    Raises what :func:`fusepool.control.request` raises when no daemon
    listens (``FileNotFoundError``/``ConnectionRefusedError``).
    """
    with control.held(pool_dir, "reserve_metadata_snap", timeout=timeout) as snap:
        txn = snap.get("transaction")
        if txn is None:  # a failed pool: its daemon walks its memory
            return control.request(pool_dir, op, args, timeout=timeout, output=output)
        superblock = bytes.fromhex(snap["superblock"])
        if op == "check":
            return check_pool(pool_dir, superblock=Superblock.unpack(superblock, txn % 2)).to_json()
        view = CommittedView.load(pool_dir, txn, superblock,
                                  {int(k): v for k, v in snap.get("open_counts", {}).items()})
        result = commands.run(view, op, args)
        if isinstance(result, control.Streamed):
            for piece in result.chunks:
                output.write(piece.encode() if isinstance(piece, str) else piece)
            result = result.result
        return result
