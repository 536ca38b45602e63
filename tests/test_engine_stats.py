"""Engine, statistics: what stats(), describe() and extents() report agree with each other.

(The Docker-style output built from them is tests/test_cli.py.)  No FUSE:
fusepool.engine.Pool directly.
"""

from engine_helpers import BS, MiB, new_pool

from fusepool.engine import Pool


def test_stats_and_describe_are_consistent(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 10 * BS)
        pool.write(v.dev_id, 0, b"x" * 4 * BS)
        pool.snapshot("v", "s")
        pool.write(v.dev_id, 0, b"y")
        pool.commit()
        st = pool.stats()
        assert st["data_blocks_used"] + st["data_blocks_free"] == st["data_blocks_total"]
        assert st["data_space_used"] == st["data_blocks_used"] * BS == 5 * BS
        assert st["data_space_total"] == 64 * MiB
        assert st["volume_count"] == 2
        assert st["metadata_space_used"] <= st["metadata_space_total"] == 8 * MiB
        assert st["transaction_id"] == pool.transaction_id
        d = pool.describe(v)
        assert (d["mapped_blocks"], d["exclusive_blocks"], d["shared_blocks"]) == (4, 1, 3)
        assert d["mapped_bytes"] == 4 * BS
        ext = pool.extents(v)
        assert sum(e["blocks"] for e in ext) == 4
        assert [e["shared"] for e in ext] == [False, True]
