"""The basic mount cycle, end to end through the CLI."""

import os

from conftest import fusepool_json, run_fusepool


def test_write_read_across_remount(pool, make_mount):
    m = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "8M")
    data = os.urandom(3 << 20)
    with open(m.vol("v"), "r+b") as f:
        assert f.read(4096) == bytes(4096)  # never written: zeros
        f.seek(12345)
        f.write(data)
    m.umount()
    m.mount()
    with open(m.vol("v"), "rb") as f:
        f.seek(12345)
        assert f.read(len(data)) == data
        f.seek(0)
        assert f.read(12345) == bytes(12345)
    assert fusepool_json("list", pool)[0]["name"] == "v"
