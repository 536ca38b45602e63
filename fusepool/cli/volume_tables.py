"""The tables of ``list``, ``list --format thin_ls`` and ``map``."""

from fusepool.cli.output import print_table
from fusepool.units import human_size


def print_volumes(vols: list[dict]) -> None:
    rows = [("NAME", "DEV_ID", "SIZE", "MAPPED", "EXCLUSIVE", "SHARED", "ORIGIN")]
    for v in vols:
        bs = v["mapped_bytes"] // v["mapped_blocks"] if v["mapped_blocks"] else 0
        rows.append((v["name"], str(v["dev_id"]), human_size(v["size"]), human_size(v["mapped_bytes"]),
                     human_size(v["exclusive_blocks"] * bs), human_size(v["shared_blocks"] * bs),
                     v["origin"] or "-"))
    print_table(rows)


def print_thin_ls(rows: list[dict]) -> None:
    """thin_ls's columns (blocks, times), plus the volume name fusepool knows."""
    table = [("DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "TRANSACTION",
              "CREATE_TIME", "SNAP_TIME", "NAME")]
    for r in rows:
        table.append((str(r["dev_id"]), str(r["mapped_blocks"]), str(r["exclusive_blocks"]),
                      str(r["shared_blocks"]), str(r["transaction"]), str(r["creation_time"]),
                      str(r["snap_time"]), r["name"]))
    print_table(table)


def print_extents(extents: list[dict]) -> None:
    rows = [("OFFSET", "LENGTH", "VIRTUAL_BLOCK", "DATA_BLOCK", "BLOCKS", "STATE")]
    for e in extents:
        rows.append((str(e["offset"]), str(e["length"]), str(e["virtual_block"]), str(e["data_block"]),
                     str(e["blocks"]), "shared" if e["shared"] else "exclusive"))
    print_table(rows)
