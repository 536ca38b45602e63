"""Interoperability with the real thin-provisioning-tools (0.9), Docker's store and raw images.

fusepool's XML must be what ``thin_dump`` writes and what ``thin_restore`` /
``thin_check`` accept; XML the tools write must restore into a pool whose
volumes read the data the mappings point at.  Every comparison is made
against the tools' own output or an independently computed expectation, never
against fusepool's own parser: the XML here is read with ElementTree, mapping
by mapping (runs expanded to per-block ``(vblock, dblock, time)``).

Mounts are daemon subprocesses (``make_mount``); reads through a mount drop the
file's page cache first so what is compared is what the daemon serves.
"""

import json
import os
import random
import re
import subprocess
import time
from collections import defaultdict
from xml.etree import ElementTree

import pytest
from conftest import fusepool_json, require, run_fusepool, write_fully
from conftest import read_all as read_range

from fusepool.cli import pool_call

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = 64 * KiB
TINY = ("--data-size", "64M", "--metadata-size", "16M")


@pytest.fixture(autouse=True)
def _thin_tools():
    require("thin_restore", "thin_dump", "thin_check", "thin_ls", "thin_delta")


# --- helpers ----------------------------------------------------------------------------

def tool(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    """Run an external program; it must succeed."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, (f"{' '.join(map(str, args))} failed ({proc.returncode}): "
                                  f"{proc.stderr.strip()} {proc.stdout.strip()[:2000]}")
    return proc


def thin_restore(xml_path, meta_path, size=16 * MiB) -> None:
    """Binary dm-thin metadata from XML, by the real tool; thin_check must pass it."""
    with open(meta_path, "wb") as f:
        f.truncate(size)
    tool("thin_restore", "-i", xml_path, "-o", meta_path)
    tool("thin_check", meta_path)


def parse_dump(text: str):
    """``(superblock attrs, {dev_id: (device attrs, {vblock: (dblock, time)})}, elements)``.

    ``elements`` is ``{dev_id: [(tag, attrs), ...]}`` in document order, to check
    the run structure.  Fails on anything thin_dump would not write.
    """
    root = ElementTree.fromstring(text)
    assert root.tag == "superblock"
    sb = dict(root.attrib)
    devices, elements = {}, {}
    for d in root:
        assert d.tag == "device", d.tag
        attrs = {k: int(v) for k, v in d.attrib.items()}
        maps, elems = {}, []
        for m in d:
            a = {k: int(v) for k, v in m.attrib.items()}
            elems.append((m.tag, a))
            if m.tag == "range_mapping":
                triples = [(a["origin_begin"] + i, a["data_begin"] + i, a["time"])
                           for i in range(a["length"])]
            elif m.tag == "single_mapping":
                triples = [(a["origin_block"], a["data_block"], a["time"])]
            else:
                raise AssertionError(f"unexpected element <{m.tag}>")
            for vb, db, t in triples:
                assert vb not in maps, f"device {attrs['dev_id']} maps virtual block {vb} twice"
                maps[vb] = (db, t)
        assert attrs["dev_id"] not in devices
        devices[attrs["dev_id"]] = (attrs, maps)
        elements[attrs["dev_id"]] = elems
    return sb, devices, elements


def block_set(devices) -> set:
    """Every mapping as ``(dev_id, vblock, dblock, time)``."""
    return {(dev_id, vb, db, t) for dev_id, (_, maps) in devices.items() for vb, (db, t) in maps.items()}


def assert_same_metadata(a_text: str, b_text: str, what: str, ignore=("uuid",)) -> None:
    """Semantically equal dumps: superblock (but ``ignore``), device attributes, mappings."""
    sa, da, _ = parse_dump(a_text)
    sb, db, _ = parse_dump(b_text)
    sa, sb = ({k: v for k, v in s.items() if k not in ignore} for s in (sa, sb))
    assert sa == sb, f"{what}: superblocks differ: {sa} != {sb}"
    assert {k: v[0] for k, v in da.items()} == {k: v[0] for k, v in db.items()}, \
        f"{what}: device attributes differ"
    ma, mb = block_set(da), block_set(db)
    assert ma == mb, f"{what}: mappings differ: only in first {sorted(ma - mb)[:10]}, " \
        f"only in second {sorted(mb - ma)[:10]}"


def sharers(devices) -> dict:
    """``{dblock: [(dev_id, time), ...]}``."""
    out = defaultdict(list)
    for dev_id, (_, maps) in devices.items():
        for _vb, (db, t) in maps.items():
            out[db].append((dev_id, t))
    return out


def assert_time_model(devices) -> int:
    """Every data block mapped by two devices is seen as shared by the kernel in each of them:
    its mapping time is older than every referencing device's snap_time.  Returns the number of
    shared data blocks."""
    shared = 0
    for db, users in sharers(devices).items():
        if len(users) < 2:
            continue
        shared += 1
        for dev_id, t in users:
            snap = devices[dev_id][0]["snap_time"]
            assert t < snap, (f"data block {db} is shared by devices {[u for u, _ in users]} but device "
                              f"{dev_id} maps it at time {t}, not before its snap_time {snap}")
    return shared


def assert_runs_maximal(elements) -> None:
    """thin_dump's run structure: range_mapping only for length >= 2, and no two
    consecutive elements that thin_dump would have merged into one run."""
    for dev_id, elems in elements.items():
        prev = None
        for tag, a in elems:
            if tag == "range_mapping":
                assert a["length"] >= 2, f"device {dev_id}: a range_mapping of length {a['length']}"
                run = (a["origin_begin"], a["data_begin"], a["length"], a["time"])
            else:
                run = (a["origin_block"], a["data_block"], 1, a["time"])
            if prev:
                assert run[0] >= prev[0] + prev[2], f"device {dev_id}: mappings out of order"
                assert not (run[0] == prev[0] + prev[2] and run[1] == prev[1] + prev[2]
                            and run[3] == prev[3]), f"device {dev_id}: runs {prev} and {run} not merged"
            prev = run


def thin_ls(meta) -> dict:
    cols = ["DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "TRANSACTION", "CREATE_TIME",
            "SNAP_TIME"]
    out = tool("thin_ls", "--no-headers", "-o", ",".join(cols), meta).stdout
    rows = {}
    for line in out.splitlines():
        if line.strip():
            vals = [int(x) for x in line.split()]
            rows[vals[0]] = dict(zip(cols, vals, strict=False))
    return rows


def fusepool_thin_ls(pool) -> dict:
    rows = json.loads(run_fusepool("list", pool, "--format", "thin_ls", "--json").stdout)
    return {r["dev_id"]: {"DEV": r["dev_id"], "MAPPED_BLOCKS": r["mapped_blocks"],
                          "EXCLUSIVE_BLOCKS": r["exclusive_blocks"], "SHARED_BLOCKS": r["shared_blocks"],
                          "TRANSACTION": r["transaction"], "CREATE_TIME": r["creation_time"],
                          "SNAP_TIME": r["snap_time"]} for r in rows}


def thin_delta(meta, a: int, b: int) -> tuple[list[dict], str]:
    text = tool("thin_delta", "--snap1", a, "--snap2", b, meta).stdout
    root = ElementTree.fromstring(text)
    (diff,) = list(root)
    assert diff.tag == "diff" and diff.get("left") == str(a) and diff.get("right") == str(b)
    return [{"kind": e.tag, "begin": int(e.get("begin")), "length": int(e.get("length"))}
            for e in diff], text


def check_clean(pool) -> None:
    report = fusepool_json("check", pool)
    assert report["ok"], f"fusepool check {pool}: {report['problems']}"


def vols(pool) -> dict:
    return {v["name"]: v for v in fusepool_json("list", pool)}




def check_blocks(actual: bytes, expected, name: str, bs: int = BS) -> None:
    """Equal, or an assertion naming the first differing block (not megabytes of repr)."""
    assert len(actual) == len(expected), f"{name}: length {len(actual)} != {len(expected)}"
    if actual != expected:
        for b in range(0, len(expected), bs):
            if actual[b : b + bs] != expected[b : b + bs]:
                raise AssertionError(f"{name}: content differs in block {b // bs}: read "
                                     f"{bytes(actual[b : b + 24])!r}..., "
                                     f"expected {bytes(expected[b : b + 24])!r}...")


def one_line_error(proc, status: int) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusepool: error: "), proc.stderr
    return lines[0]


def block_content(db: int, bs: int) -> bytes:
    """A recognisable data block: its own number all over it."""
    unit = b"<data block %06d>" % db
    return (unit * (bs // len(unit) + 1))[:bs]


def make_data_image(path, nr_blocks: int, bs: int, mapped: set, junk: set = frozenset()) -> None:
    """A sparse data image: recognisable content at every mapped data block, junk elsewhere
    (which no volume may ever show)."""
    with open(path, "wb") as f:
        f.truncate(nr_blocks * bs)
        for db in sorted(mapped):
            f.seek(db * bs)
            f.write(block_content(db, bs))
        for db in sorted(junk):
            f.seek(db * bs)
            f.write(b"JUNK" * (bs // 4))


def expected_volume(maps: dict, size: int, bs: int) -> bytearray:
    out = bytearray(size)
    for vb, (db, _) in maps.items():
        out[vb * bs : (vb + 1) * bs] = block_content(db, bs)
    return out


# --- 1. round trip out: fusepool -> thin tools -> fusepool ------------------------------------

def test_round_trip_out_through_the_thin_tools(make_pool, make_mount, tmp_path):
    src = make_pool("src", *TINY)
    m = make_mount(src)
    rng = random.Random(11)
    models: dict[str, bytearray] = {}

    def new(name, size):
        pool_call(str(src), "create", {"name": name, "size": size})
        models[name] = bytearray(size)

    def put(name, offset, data):
        write_fully(m.vol(name), offset, data)
        models[name][offset : offset + len(data)] = data

    def snap(origin, name):
        pool_call(str(src), "snapshot", {"origin": origin, "name": name})
        models[name] = bytearray(models[origin])

    def discard(name, offset, length):
        pool_call(str(src), "discard", {"name": name, "offset": offset, "length": length})
        first, last = -(-offset // BS), (offset + length) // BS
        models[name][first * BS : last * BS] = bytes((last - first) * BS)

    new("a", 4 * MiB)
    for b in range(64):
        if b % 5 != 2:
            put("a", b * BS, rng.randbytes(BS))
    put("a", 2 * BS + 777, rng.randbytes(333))  # a partial write into a hole
    new("b", 2 * MiB)  # unrelated to everything else
    put("b", 100_000, rng.randbytes(300_000))
    new("big", 1 * GiB)  # a two-level mapping tree
    put("big", 5, rng.randbytes(1000))
    put("big", 900 * MiB, rng.randbytes(BS))

    snap("a", "s")
    put("a", 3 * BS + 100, rng.randbytes(50))  # CoW of a shared block, origin side
    put("s", 7 * BS + 10, rng.randbytes(1000))  # CoW, snapshot side
    put("s", 10 * BS - 30, rng.randbytes(60))  # straddles two shared blocks
    put("a", 20 * BS, rng.randbytes(BS))  # a whole shared block replaced
    snap("s", "ss")  # a snapshot of a snapshot
    put("ss", 40, rng.randbytes(100))
    put("s", BS + 5, rng.randbytes(10))  # s's own CoW'd-after-snapshot block, CoW'd again
    put("s", 7 * BS + 20, rng.randbytes(10))  # s's block from before ss: shared with ss now
    discard("ss", 12 * BS - 100, 3 * BS + 200)  # blocks 12..14 (rounded inward)
    discard("a", 30 * BS, 2 * BS)
    put("s", 5 * BS, bytes(BS))  # zeros over a whole block unmap it
    snap("big", "bigs")
    put("bigs", 900 * MiB + 10, rng.randbytes(20))
    snap("a", "gone")  # a snapshot removed again: a's blocks keep old times, exclusive now
    put("gone", 0, rng.randbytes(10))
    pool_call(str(src), "remove", {"name": "gone"})
    del models["gone"]
    snap("ss", "sss")  # three levels deep, untouched

    for name, model in models.items():  # sanity: the source pool is what we think it is
        if name not in ("big", "bigs"):
            check_blocks(read_range(m.vol(name)), model, f"source {name}")
    run_fusepool("dump", src, "-o", tmp_path / "online.xml")  # through the daemon
    m.umount()

    xml, names = tmp_path / "x.xml", tmp_path / "n.json"
    run_fusepool("dump", src, "-o", xml, "--names", names)
    text = xml.read_text()
    # (the superblock's transaction may move if the unmount commits)
    assert_same_metadata((tmp_path / "online.xml").read_text(), text, "online vs offline dump",
                         ignore=("transaction",))
    sb, devices, elements = parse_dump(text)
    listed = vols(src)
    assert sb["data_block_size"] == str(BS // 512) and sb["nr_data_blocks"] == str(64 * MiB // BS)
    assert sb["uuid"] == json.loads((src / "pool.json").read_text())["uuid"]
    assert set(devices) == {v["dev_id"] for v in listed.values()}
    for v in listed.values():
        attrs, maps = devices[v["dev_id"]]
        assert attrs["mapped_blocks"] == len(maps) == v["mapped_blocks"], v["name"]
        assert (attrs["creation_time"], attrs["snap_time"], attrs["transaction"]) == \
            (v["creation_time"], v["snap_time"], v["transaction"]), v["name"]
        extents = {vb: e["data_block"] + vb - e["virtual_block"]
                   for e in pool_call(str(src), "map", {"name": v["name"]})
                   for vb in range(e["virtual_block"], e["virtual_block"] + e["blocks"])}
        assert extents == {vb: db for vb, (db, _) in maps.items()}, f"{v['name']}: dump != map"
    assert json.loads(names.read_text()) == {
        str(v["dev_id"]): {"name": v["name"], "size": v["size"]} for v in listed.values()}
    assert assert_time_model(devices) > 40
    assert max(len(u) for u in sharers(devices).values()) >= 4  # a, s, ss, sss share blocks
    assert_runs_maximal(elements)
    assert any(tag == "range_mapping" for e in elements.values() for tag, _ in e)
    assert any(tag == "single_mapping" for e in elements.values() for tag, _ in e)

    # The real tools take it, check it and give the same mappings back.
    meta = tmp_path / "META"
    thin_restore(xml, meta)
    dumped = tool("thin_dump", meta).stdout
    assert_same_metadata(text, dumped, "fusepool dump vs thin_dump of thin_restore")
    # ...even to the byte: fusepool writes thin_dump's own XML (only the uuid is not kept by 0.9)
    assert re.sub(r'uuid="[^"]*"', 'uuid=""', text, count=1) == dumped
    assert thin_ls(meta) == fusepool_thin_ls(src)

    # thin_dump's XML (no uuid, no names inside) and the data file make an identical pool.
    (tmp_path / "y.xml").write_text(dumped)
    new_pool = tmp_path / "restored"
    run_fusepool("restore", new_pool, "-i", tmp_path / "y.xml", "--data", src / "data", "--names", names)
    check_clean(new_pool)
    restored = vols(new_pool)
    keys = ("dev_id", "size", "mapped_blocks", "exclusive_blocks", "shared_blocks", "creation_time",
            "snap_time", "transaction")
    assert {n: {k: v[k] for k in keys} for n, v in restored.items()} == \
        {n: {k: v[k] for k in keys} for n, v in listed.items()}
    redump = run_fusepool("dump", new_pool).stdout
    assert re.sub(r'uuid="[^"]*"', 'uuid=""', redump, count=1) == dumped
    for name in listed:  # same extents, same sharing (asked in-process: cheaper than the CLI)
        assert pool_call(str(new_pool), "map", {"name": name}) == pool_call(str(src), "map", {"name": name})

    m_src = make_mount(src)
    m_new = make_mount(new_pool)
    for name, model in models.items():
        if name in ("big", "bigs"):  # 1 GiB each: the mapped blocks, and one hole
            for off in (0, 900 * MiB, 500 * MiB):
                a = read_range(m_new.vol(name), off, BS)
                assert a == read_range(m_src.vol(name), off, BS) == model[off : off + BS], (name, off)
            continue
        got = read_range(m_new.vol(name))
        check_blocks(got, model, f"restored {name}")
        assert got == read_range(m_src.vol(name)), name

    # The restored pool knows which blocks are shared: writes into them copy, never overwrite.
    before = {name: bytes(models[name]) for name in ("a", "s", "ss", "sss")}
    for name in ("a", "s", "ss"):
        data = b"fresh-" + name.encode()
        write_fully(m_new.vol(name), 8 * BS + 1234, data)
        models[name][8 * BS + 1234 : 8 * BS + 1234 + len(data)] = data
    for name in ("a", "s", "ss", "sss"):
        check_blocks(read_range(m_new.vol(name)), models[name], f"restored {name} after CoW")
        check_blocks(read_range(m_src.vol(name)), before[name], f"source {name} untouched")
    m_new.umount()
    m_src.umount()
    check_clean(new_pool)
    check_clean(src)


def test_golden_dump_restore_dump_is_identical(tmp_path):
    """dump -> restore -> dump gives the same XML and names, byte for byte (uuid kept too)."""
    from fusepool.engine import Pool

    pool = tmp_path / "p"
    run_fusepool("init", pool, "--block-size", "128K", *TINY)
    rng = random.Random(5)
    with Pool.open(str(pool)) as p:  # built offline, through the engine
        a = p.create_volume("a", 8 * MiB)
        p.write(a.dev_id, 0, rng.randbytes(3 * MiB))
        p.write(a.dev_id, 5 * MiB + 3, rng.randbytes(100))
        p.commit()
        s = p.snapshot("a", "s")
        p.write(s.dev_id, 200_000, rng.randbytes(10))
        p.write(a.dev_id, 1 * MiB, rng.randbytes(300_000))
        p.commit()
        ss = p.snapshot("s", "ss")
        p.write(ss.dev_id, 7 * MiB, rng.randbytes(10))
        p.discard(s.dev_id, 0, 1 * MiB)
        p.create_volume("empty", 1 * MiB)
        e = p.create_volume("e", 1 * MiB)
        p.write(e.dev_id, 0, rng.randbytes(10))
        p.commit()
    run_fusepool("dump", pool, "-o", tmp_path / "1.xml", "--names", tmp_path / "1.json")
    run_fusepool("restore", tmp_path / "q", "-i", tmp_path / "1.xml", "--data", pool / "data",
                 "--names", tmp_path / "1.json")
    run_fusepool("dump", tmp_path / "q", "-o", tmp_path / "2.xml", "--names", tmp_path / "2.json")
    assert (tmp_path / "2.xml").read_text() == (tmp_path / "1.xml").read_text()
    assert (tmp_path / "2.json").read_text() == (tmp_path / "1.json").read_text()
    # stdout is the same XML as -o
    assert run_fusepool("dump", tmp_path / "q").stdout == (tmp_path / "1.xml").read_text()
    check_clean(tmp_path / "q")
    for name in ("a", "s", "ss", "e", "empty"):
        out1, out2 = tmp_path / f"{name}.1", tmp_path / f"{name}.2"
        run_fusepool("export", pool, name, out1, "--sparse")
        run_fusepool("export", tmp_path / "q", name, out2, "--sparse")
        assert out1.read_bytes() == out2.read_bytes(), name


# --- 2. round trip in: hand-written XML -> thin tools -> fusepool -------------------------------

# A history as a kernel would have made it (block size 128 KiB, pool time 3):
#   t0: dev 1 written; t->1: snapshot 1 -> 2; dev 2 copies vb 3, writes vb 12, discards vb 4;
#   dev 1 writes vb 10; t->2: snapshot 2 -> 3; dev 3 copies vb 0, writes vb 13 and 100;
#   devs 4 (unrelated) and 5 (empty) created; t->3: snapshot 1 -> 6; dev 6 copies vb 1.
HAND_XML = """\
<superblock uuid="" time="3" transaction="9" flags="0" version="2" data_block_size="256" nr_data_blocks="64">
  <device dev_id="1" mapped_blocks="8" transaction="0" creation_time="0" snap_time="3">
    <range_mapping origin_begin="0" data_begin="0" length="6" time="0"/>
    <single_mapping origin_block="10" data_block="20" time="1"/>
    <single_mapping origin_block="11" data_block="30" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="7" transaction="1" creation_time="1" snap_time="2">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="3" data_block="8" time="1"/>
    <single_mapping origin_block="5" data_block="5" time="0"/>
    <single_mapping origin_block="11" data_block="30" time="0"/>
    <single_mapping origin_block="12" data_block="6" time="1"/>
  </device>
  <device dev_id="3" mapped_blocks="9" transaction="2" creation_time="2" snap_time="2">
    <single_mapping origin_block="0" data_block="9" time="2"/>
    <single_mapping origin_block="1" data_block="1" time="0"/>
    <single_mapping origin_block="2" data_block="2" time="0"/>
    <single_mapping origin_block="3" data_block="8" time="1"/>
    <single_mapping origin_block="5" data_block="5" time="0"/>
    <single_mapping origin_block="11" data_block="30" time="0"/>
    <single_mapping origin_block="12" data_block="6" time="1"/>
    <single_mapping origin_block="13" data_block="7" time="2"/>
    <single_mapping origin_block="100" data_block="40" time="2"/>
  </device>
  <device dev_id="4" mapped_blocks="9" transaction="3" creation_time="2" snap_time="2">
    <range_mapping origin_begin="0" data_begin="50" length="8" time="2"/>
    <single_mapping origin_block="1000" data_block="60" time="2"/>
  </device>
  <device dev_id="5" mapped_blocks="0" transaction="4" creation_time="2" snap_time="2">
  </device>
  <device dev_id="6" mapped_blocks="8" transaction="5" creation_time="3" snap_time="3">
    <single_mapping origin_block="0" data_block="0" time="0"/>
    <single_mapping origin_block="1" data_block="10" time="3"/>
    <range_mapping origin_begin="2" data_begin="2" length="4" time="0"/>
    <single_mapping origin_block="10" data_block="20" time="1"/>
    <single_mapping origin_block="11" data_block="30" time="0"/>
  </device>
</superblock>
"""
HAND_BS = 256 * 512
HAND_NAMES = {1: "origin", 2: "snap", 3: "snapsnap", 6: "late-snap"}  # 4 and 5: named by dev_id


def test_round_trip_in_hand_written_xml(tmp_path, make_mount):
    hand = tmp_path / "hand.xml"
    hand.write_text(HAND_XML)
    _, expected, _ = parse_dump(HAND_XML)
    assert assert_time_model(expected) > 0  # the script itself is a valid kernel history
    meta = tmp_path / "META"
    thin_restore(hand, meta)
    dumped_text = tool("thin_dump", meta).stdout
    assert_same_metadata(HAND_XML, dumped_text, "hand XML vs thin_dump", ignore=())
    dumped = tmp_path / "dumped.xml"
    dumped.write_text(dumped_text)

    mapped = {db for _, maps in expected.values() for db, _ in maps.values()}
    data = tmp_path / "data.img"
    make_data_image(data, 64, HAND_BS, mapped, junk={11, 12, 13, 41, 59, 61, 63} - mapped)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({str(k): {"name": v, "size": 16 * MiB} for k, v in HAND_NAMES.items()}))
    pool = tmp_path / "pool"
    run_fusepool("restore", pool, "-i", dumped, "--data", data, "--names", names)
    check_clean(pool)

    name_of = {d: HAND_NAMES.get(d, str(d)) for d in expected}
    size_of = {d: 16 * MiB if d in HAND_NAMES else (max(expected[d][1], default=-1) + 1) * HAND_BS
               for d in expected}
    assert size_of[4] == 1001 * HAND_BS and size_of[5] == 0
    listed = vols(pool)
    assert {n: (v["dev_id"], v["size"], v["mapped_blocks"]) for n, v in listed.items()} == \
        {name_of[d]: (d, size_of[d], len(expected[d][1])) for d in expected}
    st = fusepool_json("info", pool)
    assert (st["block_size"], st["data_blocks_total"], st["data_blocks_used"]) == (HAND_BS, 64, len(mapped))

    # thin_ls, fusepool and an independent count agree.
    refs = sharers(expected)
    independent = {d: {"DEV": d, "MAPPED_BLOCKS": len(maps),
                       "EXCLUSIVE_BLOCKS": sum(1 for db, _ in maps.values() if len(refs[db]) == 1),
                       "SHARED_BLOCKS": sum(1 for db, _ in maps.values() if len(refs[db]) > 1),
                       "TRANSACTION": attrs["transaction"], "CREATE_TIME": attrs["creation_time"],
                       "SNAP_TIME": attrs["snap_time"]} for d, (attrs, maps) in expected.items()}
    assert thin_ls(meta) == independent
    assert fusepool_thin_ls(pool) == independent

    # thin_delta and fusepool delta agree, ranges and text.
    for a, b in [(1, 2), (2, 1), (2, 3), (1, 3), (1, 6), (3, 6), (1, 4), (4, 5), (5, 4), (3, 3)]:
        ranges, text = thin_delta(meta, a, b)
        ours = fusepool_json("delta", pool, name_of[a], name_of[b])
        assert ours == ranges, f"delta {a} {b}: fusepool {ours} != thin_delta {ranges}"
        assert run_fusepool("delta", pool, name_of[a], name_of[b]).stdout.strip() == text.strip()

    # Volumes read the data at their mapped data blocks; unmapped blocks read zeros.
    m = make_mount(pool)
    for d, (_, maps) in expected.items():
        path = m.vol(name_of[d])
        assert os.path.getsize(path) == size_of[d]
        if size_of[d] <= 16 * MiB:
            check_blocks(read_range(path), expected_volume(maps, size_of[d], HAND_BS), name_of[d], HAND_BS)
        else:  # "4": 125 MiB; its mapped blocks and the holes next to them
            for vb in (0, 7, 8, 9, 500, 999, 1000):
                want = block_content(maps[vb][0], HAND_BS) if vb in maps else bytes(HAND_BS)
                assert read_range(path, vb * HAND_BS, HAND_BS) == want, (name_of[d], vb)
    # Written through the mount, a shared block is copied; its other users keep the old data.
    write_fully(m.vol("origin"), 2 * HAND_BS + 5, b"changed")
    assert read_range(m.vol("origin"), 2 * HAND_BS, 16) == block_content(2, HAND_BS)[:5] + b"changed" + \
        block_content(2, HAND_BS)[12:16]
    for name in ("snap", "snapsnap", "late-snap"):
        assert read_range(m.vol(name), 2 * HAND_BS, HAND_BS) == block_content(2, HAND_BS), name
    m.umount()
    check_clean(pool)
    with open(data, "rb") as f:  # the restore copied the data image, it did not write to it
        f.seek(2 * HAND_BS)
        assert f.read(HAND_BS) == block_content(2, HAND_BS)


# --- 3. Docker's devicemapper store -------------------------------------------------------------

LAYER = "3f4e8b1c9d2a7e6f5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a"
CID = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
DOCKER_SIZE = 10 * GiB


def docker_history():
    """base (1) -> layer (2) -> <cid>-init (3) -> <cid> (4), each a snapshot of the one before,
    each writing a little (time t after the t-th snapshot)."""
    base = {vb: (vb, 0) for vb in range(10)} | {1000: (10, 0), 163839: (11, 0)}  # 10 GiB: last block
    layer = {k: v for k, v in base.items() if k != 3} | {2: (20, 1), 50: (21, 1), 51: (22, 1), 52: (23, 1)}
    init = layer | {60: (30, 2), 5: (31, 2)}
    cid = init | {70: (40, 3), 0: (41, 3)}
    maps = {1: base, 2: layer, 3: init, 4: cid}
    times = {1: (0, 1), 2: (1, 2), 3: (2, 3), 4: (3, 3)}  # creation_time, snap_time
    lines = ['<superblock uuid="" time="3" transaction="4" flags="0" version="2" data_block_size="128" '
             'nr_data_blocks="128">']
    for d, mp in maps.items():
        lines.append(f'  <device dev_id="{d}" mapped_blocks="{len(mp)}" transaction="{d - 1}" '
                     f'creation_time="{times[d][0]}" snap_time="{times[d][1]}">')
        for vb in sorted(mp):
            lines.append(f'    <single_mapping origin_block="{vb}" data_block="{mp[vb][0]}" '
                         f'time="{mp[vb][1]}"/>')
        lines.append("  </device>")
    lines.append("</superblock>\n")
    return maps, "\n".join(lines)


def make_docker_dir(root, tmp_path):
    maps, xml = docker_history()
    _, parsed, _ = parse_dump(xml)
    assert assert_time_model(parsed) > 0
    dm, md = root / "devicemapper", root / "metadata"
    dm.mkdir(parents=True)
    md.mkdir()
    (tmp_path / "docker.xml").write_text(xml)
    thin_restore(tmp_path / "docker.xml", dm / "metadata")
    make_data_image(dm / "data", 128, BS, {db for mp in maps.values() for db, _ in mp.values()})
    names = {1: "base", 2: LAYER, 3: f"{CID}-init", 4: CID}
    for d, name in names.items():
        (md / name).write_text(json.dumps({"device_id": d, "size": DOCKER_SIZE, "transaction_id": d,
                                           "initialized": True, "deleted": False}))
    (md / "deviceset-metadata").write_text(json.dumps(
        {"next_device_id": 5, "BaseDeviceUUID": "6b1d4a0e-8c1f-4a36-9d0b-2f5e7c3a9e11",
         "BaseDeviceFilesystem": "ext4"}))
    (md / "transaction-metadata").write_text(json.dumps(
        {"open_transaction_id": 0, "device_hash": "", "device_id": 0}))
    return maps, names


def test_import_docker_devicemapper_directory(tmp_path, make_mount):
    docker = tmp_path / "docker"
    maps, names = make_docker_dir(docker, tmp_path)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (docker / "devicemapper").iterdir()}
    pool = tmp_path / "pool"
    out = run_fusepool("import-docker", docker, pool).stdout
    assert "imported 4 device(s)" in out
    listed = vols(pool)
    assert {n: (v["dev_id"], v["size"], v["mapped_blocks"]) for n, v in listed.items()} == \
        {names[d]: (d, DOCKER_SIZE, len(mp)) for d, mp in maps.items()}
    assert json.loads(run_fusepool("inspect", pool, CID).stdout)["Data"]["DeviceId"] == "4"
    check_clean(pool)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (docker / "devicemapper").iterdir()} == before

    m = make_mount(pool)
    for d, mp in maps.items():
        path = m.vol(names[d])
        assert os.path.getsize(path) == DOCKER_SIZE
        for vb in sorted(set(mp) | {3, 12, 49, 60, 70, 5000}):
            want = block_content(mp[vb][0], BS) if vb in mp else bytes(BS)
            assert read_range(path, vb * BS, BS) == want, (names[d], vb)
    # The container writes into a block it shares with the image: the image keeps its data.
    write_fully(m.vol(CID), 1000 * BS, b"container write")
    assert read_range(m.vol(CID), 1000 * BS, 15) == b"container write"
    for name in ("base", LAYER, f"{CID}-init"):
        assert read_range(m.vol(name), 1000 * BS, BS) == block_content(10, BS), name
    m.umount()
    check_clean(pool)


def test_import_docker_without_thin_dump_and_bad_stores(tmp_path):
    docker = tmp_path / "docker"
    make_docker_dir(docker, tmp_path)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    pool = tmp_path / "pool"
    proc = run_fusepool("import-docker", docker, pool, check=False, env=dict(os.environ, PATH=str(empty_bin)))
    line = one_line_error(proc, 1)
    assert "thin-provisioning-tools" in line and "thin_dump" in line
    assert not pool.exists() or not os.listdir(pool)

    # Not a Docker store: a usage error naming what is missing.
    (tmp_path / "notdocker").mkdir()
    line = one_line_error(run_fusepool("import-docker", tmp_path / "notdocker", pool, check=False), 2)
    assert "devicemapper" in line
    assert not pool.exists() or not os.listdir(pool)


def test_import_docker_unreadable_metadata_is_one_plain_line(tmp_path):
    """thin_dump refusing the metadata: one line quoting its message (not a Python list)."""
    docker = tmp_path / "docker"
    make_docker_dir(docker, tmp_path)
    with open(docker / "devicemapper" / "metadata", "r+b") as f:
        f.write(b"\xff" * 512)  # the superblock's checksum no longer matches
    pool = tmp_path / "pool"
    line = one_line_error(run_fusepool("import-docker", docker, pool, check=False), 1)
    assert "thin_dump" in line and "checksum" in line
    assert "['" not in line and "']" not in line, f"the message shows a Python list: {line}"
    assert not pool.exists() or not os.listdir(pool)


# --- 4. raw images in and out ---------------------------------------------------------------

@pytest.fixture
def ext4_image(tmp_path):
    require("mkfs.ext4")
    src = tmp_path / "files"
    (src / "sub" / "deeper").mkdir(parents=True)
    rng = random.Random(3)
    for i in range(12):
        (src / f"file{i}.bin").write_bytes(rng.randbytes(rng.randint(1000, 60_000)))
    (src / "sub" / "text.txt").write_text("hello from fusepool\n" * 500)
    (src / "sub" / "deeper" / "big.bin").write_bytes(rng.randbytes(200 * KiB))
    img = tmp_path / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    tool("mkfs.ext4", "-q", "-F", "-d", src, img)
    return img


def nonzero_blocks(path, bs=BS) -> int:
    n = 0
    zero = bytes(bs)
    with open(path, "rb") as f:
        while block := f.read(bs):
            n += block != zero[: len(block)]
    return n


def check_export(pool, name, img, out, sparse=True) -> None:
    run_fusepool("export", pool, name, out, *(["--sparse"] if sparse else []))
    tool("cmp", img, out)
    tool("qemu-img", "compare", "-f", "raw", "-F", "raw", img, out)
    allocated = os.stat(out).st_blocks * 512
    if sparse:
        assert allocated <= nonzero_blocks(img) * BS + 1 * MiB, f"{out} is not sparse ({allocated} bytes)"
    else:
        assert allocated >= os.path.getsize(img) // 2, f"{out}: {allocated} bytes (dd-like copy expected)"


def test_import_export_raw_image_offline_and_online(make_pool, make_mount, ext4_image, tmp_path):
    require("qemu-img")
    pool = make_pool("p", *TINY)
    want_blocks = nonzero_blocks(ext4_image)
    assert 0 < want_blocks < 64 * MiB // BS // 4

    # offline
    run_fusepool("import", pool, "off", ext4_image)
    v = vols(pool)["off"]
    assert v["size"] == 64 * MiB and v["mapped_blocks"] == want_blocks
    assert fusepool_json("info", pool)["data_blocks_used"] == want_blocks
    check_export(pool, "off", ext4_image, tmp_path / "off.sparse.img")
    check_export(pool, "off", ext4_image, tmp_path / "off.full.img", sparse=False)
    tool("e2fsck", "-fn", tmp_path / "off.sparse.img")

    # online
    m = make_mount(pool)
    run_fusepool("import", pool, "on", ext4_image, "--size", "96M")
    v = vols(pool)["on"]
    assert v["size"] == 96 * MiB and v["mapped_blocks"] == want_blocks
    assert read_range(m.vol("on"), 0, 64 * MiB) == ext4_image.read_bytes()
    assert read_range(m.vol("on"), 64 * MiB) == bytes(32 * MiB)
    check_export(pool, "off", ext4_image, tmp_path / "off.online.img")
    run_fusepool("export", pool, "on", tmp_path / "on.img", "--sparse")
    with open(tmp_path / "on.img", "rb") as f:
        assert f.read(64 * MiB) == ext4_image.read_bytes() and f.read() == bytes(32 * MiB)
    assert os.stat(tmp_path / "on.img").st_blocks * 512 <= want_blocks * BS + 1 * MiB
    run_fusepool("export", pool, "on", tmp_path / "on.full.img")
    assert (tmp_path / "on.full.img").read_bytes() == (tmp_path / "on.img").read_bytes()
    assert set(vols(pool)) == {"off", "on"}  # the export's temporary snapshots are gone
    m.umount()
    check_clean(pool)


def test_failed_import_leaves_no_volume(make_pool, make_mount, tmp_path):
    pool = make_pool("small", "--data-size", "8M", "--metadata-size", "16M")
    img = tmp_path / "big.img"
    img.write_bytes(random.Random(9).randbytes(12 * MiB))  # 192 blocks, the pool has 128

    line = one_line_error(run_fusepool("import", pool, "big", img, check=False), 1)
    assert "space" in line
    assert vols(pool) == {}
    assert fusepool_json("info", pool)["data_blocks_used"] == 0
    line = one_line_error(run_fusepool("import", pool, "missing", tmp_path / "nope.img", check=False), 2)
    assert "nope.img" in line
    assert vols(pool) == {}
    check_clean(pool)

    m = make_mount(pool)
    line = one_line_error(run_fusepool("import", pool, "big", img, check=False), 1)
    assert "space" in line
    assert "big" not in os.listdir(m.mountpoint)
    deadline = time.monotonic() + 10
    while pool_call(str(pool), "info")["data_blocks_used"]:  # freed once the kernel's release arrives
        assert time.monotonic() < deadline, "the failed import's blocks were never freed"
        time.sleep(0.05)
    assert vols(pool) == {}
    line = one_line_error(run_fusepool("import", pool, "missing", tmp_path / "nope.img", check=False), 2)
    assert vols(pool) == {}
    # and the pool still works
    small_img = tmp_path / "ok.img"
    small_img.write_bytes(b"x" * 1000)  # not a whole block
    run_fusepool("import", pool, "ok", small_img)
    assert (vols(pool)["ok"]["mapped_blocks"], vols(pool)["ok"]["size"]) == (1, 1000)
    run_fusepool("export", pool, "ok", tmp_path / "ok.out", "--sparse")
    assert (tmp_path / "ok.out").read_bytes() == b"x" * 1000
    m.umount()
    check_clean(pool)


# --- 5. restore refuses bad XML ---------------------------------------------------------------

VALID = """\
<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="{bs}" nr_data_blocks="64">
  <device dev_id="{id1}" mapped_blocks="3" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="3" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="{t}"/>
    <single_mapping origin_block="2" data_block="{db}" time="1"/>{extra}
  </device>
</superblock>
"""


def valid_xml(**kw) -> str:
    return VALID.format(**({"bs": 128, "id1": 1, "t": 0, "db": 5, "extra": ""} | kw))


REFUSED = {
    "unknown-element": (valid_xml(extra='\n    <weird_mapping origin_block="9" data_block="9" time="1"/>'),
                        "weird_mapping"),
    "unknown-top-element": (valid_xml().replace("</superblock>", "<metadata_snap/></superblock>"),
                            "metadata_snap"),
    "unknown-attribute": (valid_xml().replace('snap_time="1">', 'snap_time="1" colour="red">', 1), "colour"),
    "block-size-96K": (valid_xml(bs=192), "192"),
    "dev-id-2^24": (valid_xml(id1=2**24), "24"),
    "beyond-nr-data-blocks": (valid_xml(db=64), "nr_data_blocks"),
    "range-beyond-nr-data-blocks": (
        valid_xml().replace('data_begin="0" length="3"', 'data_begin="62" length="3"'), "nr_data_blocks"),
    "unrelated-devices-share": (valid_xml(t=1), "data block 0"),
    "flags-not-a-number": (valid_xml().replace('flags="0"', 'flags="x"'), "flags"),
    # 10^15 blocks of 64 KiB: far beyond fusepool's largest volume (2^60 bytes)
    "vblock-beyond-largest-volume": (
        valid_xml().replace('origin_block="2"', 'origin_block="1000000000000000"'), None),
    "malformed": (valid_xml()[:-30], "XML"),
    "not-xml": ("this is not XML at all\n", "XML"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_restore_refuses_bad_xml(tmp_path, case):
    text, word = REFUSED[case]
    xml = tmp_path / "bad.xml"
    xml.write_text(text)
    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.truncate(64 * 96 * KiB)
    pool = tmp_path / "pool"
    line = one_line_error(run_fusepool("restore", pool, "-i", xml, "--data", data, check=False), 2)
    assert word is None or word in line, line
    assert not pool.exists() or not os.listdir(pool)


BAD_NAMES = {  # device 1 maps virtual blocks 0..2, device 2 too, device 3 nothing
    "size-not-a-number": {"1": {"name": "a", "size": "10G"}},
    "entry-not-an-object": {"1": "a"},
    "negative-size": {"3": {"name": "empty", "size": -5}},
    "size-beyond-largest-volume": {"1": {"name": "a", "size": 1 << 61}},
    "size-not-covering-mappings": {"1": {"name": "a", "size": 2 * BS}},
    "invalid-name": {"1": {"name": "a/b"}},
    "one-name-twice": {"1": {"name": "a"}, "2": {"name": "a"}},
    "not-a-mapping": [1, 2],
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_restore_refuses_bad_names_files(tmp_path, case):
    xml, names, data = tmp_path / "ok.xml", tmp_path / "names.json", tmp_path / "data.img"
    xml.write_text(valid_xml().replace("</superblock>", '  <device dev_id="3" mapped_blocks="0" '
                                       'transaction="1" creation_time="1" snap_time="1">\n  </device>\n'
                                       '</superblock>'))
    names.write_text(json.dumps(BAD_NAMES[case]))
    with open(data, "wb") as f:
        f.truncate(64 * BS)
    pool = tmp_path / "pool"
    proc = run_fusepool("restore", pool, "-i", xml, "--data", data, "--names", names, check=False)
    if proc.returncode == 0:
        pytest.fail(f"restore accepted names {BAD_NAMES[case]}: made volumes "
                    f"{[(v['name'], v['size']) for v in fusepool_json('list', pool)]}")
    one_line_error(proc, 2)
    assert not pool.exists() or not os.listdir(pool)


def test_restore_accepts_the_valid_control_and_refuses_bad_surroundings(tmp_path):
    """The unmutated XML restores (so each refusal above is the mutation's); a too-small data
    image, a taken pool directory, or names that do not cover the mappings are refused."""
    xml = tmp_path / "ok.xml"
    xml.write_text(valid_xml())
    thin_restore(xml, tmp_path / "META")  # the real tools accept the control too
    data = tmp_path / "data.img"
    make_data_image(data, 64, BS, {0, 1, 2, 5})
    small = tmp_path / "small.img"
    with open(small, "wb") as f:
        f.truncate(63 * BS)

    line = one_line_error(run_fusepool("restore", tmp_path / "p1", "-i", xml, "--data", small,
                                       check=False), 2)
    assert "data image" in line and not (tmp_path / "p1").exists()
    names = tmp_path / "n.json"
    names.write_text(json.dumps({"1": {"name": "x", "size": 2 * BS}}))  # maps block 2: needs 3 blocks
    line = one_line_error(run_fusepool("restore", tmp_path / "p2", "-i", xml, "--data", data,
                                       "--names", names, check=False), 2)
    assert "size" in line and not (tmp_path / "p2").exists()

    run_fusepool("restore", tmp_path / "p3", "-i", xml, "--data", data)
    check_clean(tmp_path / "p3")
    assert {n: v["mapped_blocks"] for n, v in vols(tmp_path / "p3").items()} == {"1": 3, "2": 3}
    line = one_line_error(run_fusepool("restore", tmp_path / "p3", "-i", xml, "--data", data, check=False), 2)
    assert "not an empty directory" in line


def test_restore_refuses_times_a_kernel_cannot_have(tmp_path):
    """Mapping and device times after the pool's time (and creation_time > snap_time) are no
    kernel's history; restore must refuse them, not make a pool its own check calls broken
    (the next snapshot would get a snap_time older than those mappings, so the kernel would
    overwrite shared blocks in place)."""
    xml = tmp_path / "t.xml"
    xml.write_text('<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
                   'data_block_size="128" nr_data_blocks="64">\n'
                   '  <device dev_id="1" mapped_blocks="1" transaction="0" creation_time="3" snap_time="5">\n'
                   '    <single_mapping origin_block="0" data_block="0" time="7"/>\n'
                   '  </device>\n</superblock>\n')
    thin_restore(xml, tmp_path / "META")  # thin_restore and thin_check do not look at times
    data = tmp_path / "data.img"
    make_data_image(data, 64, BS, {0})
    pool = tmp_path / "pool"
    proc = run_fusepool("restore", pool, "-i", xml, "--data", data, check=False)
    if proc.returncode == 0:
        report = json.loads(run_fusepool("check", pool, "--json", check=False).stdout)
        pytest.fail("restore accepted times after the pool time and made a pool `fusepool check` "
                    f"rejects: {[p['message'] for p in report['problems']]}")
    line = one_line_error(proc, 2)
    assert "time" in line
    assert not pool.exists() or not os.listdir(pool)


def test_import_stores_each_block_once_when_extents_are_not_aligned(make_pool, tmp_path):
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
        for first, last in ((0, 19), (30, 31), (40, 42)):  # data extents off 1 MiB boundaries
            f.seek(first * BS)
            f.write(random.Random(first).randbytes((last - first + 1) * BS))
    pool = make_pool("p", *TINY)
    out = run_fusepool("import", pool, "v", image).stdout
    assert f"{25 * BS} bytes stored" in out, out
    assert vols(pool)["v"]["mapped_blocks"] == 25
    run_fusepool("export", pool, "v", tmp_path / "back.img")
    assert (tmp_path / "back.img").read_bytes() == image.read_bytes()


@pytest.mark.root
def test_restore_takes_a_block_device_as_the_data(make_pool, make_mount, tmp_path):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "4M")
    data = random.Random(9).randbytes(3 * MiB)
    with open(m.vol("v"), "r+b") as f:
        f.write(data)
    run_fusepool("snapshot", pool, "v", "s")
    run_fusepool("dump", pool, "-o", tmp_path / "x.xml", "--names", tmp_path / "n.json")
    m.umount()
    image = tmp_path / "data.img"
    image.write_bytes((pool / "data").read_bytes()[: 64 * MiB])
    dev = subprocess.run(["losetup", "--find", "--show", image], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        run_fusepool("restore", tmp_path / "q", "-i", tmp_path / "x.xml", "--data", dev,
                     "--names", tmp_path / "n.json")
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    for name in ("v", "s"):
        run_fusepool("export", tmp_path / "q", name, tmp_path / f"{name}.img")
        assert (tmp_path / f"{name}.img").read_bytes()[: 3 * MiB] == data
    check_clean(tmp_path / "q")
