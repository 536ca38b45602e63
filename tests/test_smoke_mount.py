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


def test_sigterm_and_sigint_unmount_cleanly(pool, make_mount):
    """SIGTERM/SIGINT to the daemon do what `fusepool umount` does: commit, unmount, exit."""
    import signal
    import time

    from conftest import is_mounted

    run_fusepool("create", pool, "v", "--size", "4M")
    for sig in (signal.SIGTERM, signal.SIGINT):
        m = make_mount(pool, name=f"mnt-{sig.name}")
        data = os.urandom(1 << 20)
        with open(m.vol("v"), "r+b") as f:
            f.write(data)  # no fsync: the signal must commit it
        os.kill(m.pid, sig)
        deadline = time.monotonic() + 30
        while is_mounted(m.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(m.mountpoint), f"{sig.name} did not unmount"
        while os.path.exists(f"/proc/{m.pid}") and time.monotonic() < deadline:
            with open(f"/proc/{m.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        m.pid = None
        # committed: an offline reader sees the data, and the pool is not locked
        from fusepool.engine import Pool

        with Pool.open(str(pool)) as p:
            assert p.read(p.volume("v").dev_id, 0, len(data)) == data
