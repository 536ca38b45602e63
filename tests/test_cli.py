"""The `fusepool` command's contract: arguments, exit statuses, error lines, output formats.

- exit 0 on success, 1 when the operation failed, 2 for a usage error (argparse
  errors, bad sizes, bad names);
- an error is ONE line on stderr starting with ``fusepool: error:``, never a
  traceback, and nothing on stdout;
- a failed command changes nothing: ``list --json``, the ``info --json``
  figures and the pool directory (names, sizes, allocation, mtimes) are the
  same before and after.

Bad input is tried both offline (the CLI opens the pool itself) and online (the
request travels to the mount daemon over the control socket).
"""

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import SMALL_POOL, fusepool_json, is_mounted, run_fusepool

import fusepool
from fusepool.cli.table import COMMANDS as TABLE
from fusepool.engine import Pool

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BS = 64 * K  # SMALL_POOL's block size (the default)

# The contract's commands; help and argument errors are also checked for every other subcommand.
SUBCOMMANDS = ["init", "mount", "umount", "create", "snapshot", "remove", "resize", "list", "info",
               "inspect", "map", "discard", "extend"]


def parser_subcommands() -> list[str]:
    import argparse

    from fusepool.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


# Every command of the CLI's table: the contract tests below cover a new one automatically.
ALL_SUBCOMMANDS = SUBCOMMANDS + [c.name for c in TABLE if c.name not in SUBCOMMANDS]

# A valid form of every command that takes POOL first: the arguments after POOL.
POOL_COMMANDS = {
    "mount": ["{mnt}"],
    "create": ["newvol", "--size", "1M"],
    "snapshot": ["v", "newsnap"],
    "remove": ["v"],
    "resize": ["v", "16M"],
    "list": [],
    "info": [],
    "inspect": ["v"],
    "map": ["v"],
    "discard": ["v", "0", "64K"],
    "extend": ["--data-size", "1G"],
}

# `info --json` figures that only change when the pool changes (host free space excluded).
STABLE_INFO = ("pool_name", "mode", "block_size", "base_size", "data_space_total", "data_space_used",
               "metadata_space_total", "metadata_space_used", "min_free_space", "skip_block_zeroing",
               "deferred_deleted_device_count", "volume_count", "data_blocks_total",
               "data_blocks_used", "data_blocks_free", "transaction_id", "time", "read_only",
               "mounted")

LIST_KEYS = {"name", "dev_id", "size", "mapped_blocks", "exclusive_blocks", "shared_blocks", "origin"}


# --- helpers ---------------------------------------------------------------------------------

def fp(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    return run_fusepool(*args, check=False, timeout=timeout, **kw)


def assert_error(proc: subprocess.CompletedProcess, status, pattern: str | None = None) -> str:
    """One ``fusepool: error:`` line on stderr, nothing on stdout, the expected exit status."""
    where = f"exit {proc.returncode}, stdout {proc.stdout!r}, stderr {proc.stderr!r}"
    statuses = status if isinstance(status, tuple) else (status,)
    assert proc.returncode in statuses, where
    assert "Traceback" not in proc.stderr, where
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one error line: {where}"
    assert lines[0].startswith("fusepool: error: "), where
    assert len(lines[0]) > len("fusepool: error: ") + 5, where
    assert proc.stdout == "", where
    if pattern:
        assert re.search(pattern, lines[0], re.IGNORECASE), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr!r}"
    assert proc.stderr == "", proc.stderr
    return proc


def assert_equal(a, b):
    assert a == b, f"{a!r} != {b!r}"


class Checks:
    """Soft assertions: run every case of a group, then report all failures at once."""

    def __init__(self):
        self.failures: list[str] = []

    def check(self, case: str, func, *args) -> None:
        try:
            func(*args)
        except AssertionError as exc:
            self.failures.append(f"[{case}] {exc}".splitlines()[0])

    def done(self) -> None:
        if self.failures:
            pytest.fail(f"{len(self.failures)} case(s) failed:\n" + "\n".join(self.failures),
                        pytrace=False)


def file_state(path) -> dict:
    """What a failed command must not touch in a directory (or a plain file)."""
    if not os.path.lexists(path):
        return {"<missing>": True}
    if not os.path.isdir(path):
        st = os.lstat(path)
        with open(path, "rb") as f:
            return {"<file>": (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())}
    out = {}
    for entry in os.scandir(path):
        st = entry.stat(follow_symlinks=False)
        if entry.name in ("data", "metadata"):
            out[entry.name] = (st.st_size, st.st_blocks, st.st_mtime_ns)
        elif entry.name == "pool.json":
            with open(entry.path, "rb") as f:
                out[entry.name] = hashlib.sha256(f.read()).hexdigest()
        else:  # lock, control socket, daemon log: they exist (the log may grow)
            out[entry.name] = stat.S_IFMT(st.st_mode)
    return out


def pool_state(pool) -> dict:
    info = fusepool_json("info", pool)
    return {
        "list": fusepool_json("list", pool),
        "info": {k: info[k] for k in STABLE_INFO},
        "files": file_state(pool),
    }


def volume(pool, name) -> dict:
    return next(v for v in fusepool_json("list", pool) if v["name"] == name)


def fill(args, **subst):
    return [a.format(**subst) for a in args]


# --- fixtures -----------------------------------------------------------------------------------

def populate(pool) -> None:
    """v (8 MiB) with data, s a snapshot of it, then v partly rewritten (so sharing is mixed)."""
    with Pool.open(str(pool)) as p:
        v = p.create_volume("v", 8 * M)
        p.write(v.dev_id, 0, os.urandom(1 * M))  # blocks 0-15
        p.write(v.dev_id, 4 * M, os.urandom(BS))  # block 64
        p.snapshot("v", "s")
        p.write(v.dev_id, 0, os.urandom(BS))  # block 0 of v: copied, no longer shared
        p.commit()


@pytest.fixture(params=["offline", "online"])
def env(request, pool, make_mount):
    """A populated pool, mounted for the online variant.  ``env.mnt`` is None offline."""
    populate(pool)

    class Env:
        mode = request.param
        mnt = None

    Env.pool = pool
    if request.param == "online":
        Env.mnt = make_mount(pool).mountpoint
    return Env


# --- 1. arguments and help ------------------------------------------------------------------------

def test_top_level_help():
    proc = assert_ok(fp("--help"))
    assert proc.stdout.startswith("usage: fusepool")
    for cmd in ALL_SUBCOMMANDS:
        assert cmd in proc.stdout


def test_contract_commands_exist():
    assert set(SUBCOMMANDS) <= set(parser_subcommands())
    assert parser_subcommands() == [c.name for c in TABLE]  # the parser is the table


@pytest.mark.parametrize("cmd", ALL_SUBCOMMANDS)
def test_handler_exists(cmd):
    from fusepool.cli.parser import Handler

    assert callable(Handler(next(c for c in TABLE if c.name == cmd)).resolve())


@pytest.mark.parametrize("cmd", ALL_SUBCOMMANDS)
def test_subcommand_help(cmd):
    proc = assert_ok(fp(cmd, "--help"))
    assert proc.stdout.startswith(f"usage: fusepool {cmd}")


def test_version():
    proc = assert_ok(fp("--version"))
    assert proc.stdout.strip() == f"fusepool {fusepool.__version__}"


def test_no_command_is_a_usage_error():
    assert_error(fp(), 2)


def test_unknown_command_is_a_usage_error():
    assert_error(fp("frobnicate", "x"), 2)


@pytest.mark.parametrize("cmd", ALL_SUBCOMMANDS)
def test_missing_arguments(cmd, tmp_path):
    assert_error(fp(cmd, cwd=tmp_path), 2, "required")
    assert os.listdir(tmp_path) == []


# --- the CLI contract, for every command of the table (as thin-provisioning-tools' tests/common) ---

def required_args(command) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``(positional names, [(option name, its words)])`` of the command's required
    arguments, as argparse names them; values are placeholders (argparse refuses first)."""
    positionals = [a.options.get("metavar", a.dest) for a in command.args if a.positional]
    options = [("/".join(a.flags), [a.flags[-1], "x"]) for a in command.args
               if not a.positional and a.options.get("required")]
    return positionals, options


def missing_argument_cases(command) -> list[tuple[str, list[str]]]:
    """``(the argument left out, the command line without it)``: positionals from the
    end (argparse fills them in order), required options one by one."""
    positionals, options = required_args(command)
    option_words = [w for _, words in options for w in words]
    cases = [(name, ["x"] * k + option_words) for k, name in enumerate(positionals)]
    for i, (name, _) in enumerate(options):
        others = [w for j, (_, words) in enumerate(options) if j != i for w in words]
        cases.append((name, ["x"] * len(positionals) + others))
    return cases


def contract_cases() -> list:
    return [pytest.param(command, id=command.name) for command in TABLE]


@pytest.mark.parametrize("command", contract_cases())
def test_contract_help(command):
    proc = assert_ok(fp(command.name, "--help"))
    assert proc.stdout.startswith(f"usage: fusepool {command.name}"), proc.stdout
    assert " ".join(command.help.split()) in " ".join(proc.stdout.split())


@pytest.mark.parametrize("command", contract_cases())
def test_contract_each_required_argument_missing(command, tmp_path):
    cases = missing_argument_cases(command)
    assert cases, f"{command.name} takes no required argument: give it a contract case"
    for name, given in cases:
        line = assert_error(fp(command.name, *given, cwd=tmp_path), 2, "required")
        assert name in line.split("required:")[1], line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("option", ["--no-such-option", "--no-such-option=1", "-Z"])
@pytest.mark.parametrize("command", contract_cases())
def test_contract_unknown_option(command, option, tmp_path):
    positionals, options = required_args(command)
    given = ["x"] * len(positionals) + [w for _, words in options for w in words]
    assert_error(fp(command.name, *given, option, cwd=tmp_path), 2, "unrecognized")
    assert_error(fp(command.name, option, *given, cwd=tmp_path), 2, "unrecognized")
    assert os.listdir(tmp_path) == []


def exclusive_cases() -> list:
    """``(command, two options of one mutually exclusive group)`` for every group of the table."""
    cases = []
    for command in TABLE:
        groups: dict[str, list] = {}
        for arg in command.args:
            if arg.exclusive:
                groups.setdefault(arg.exclusive, []).append(arg)
        for name, args in groups.items():
            assert len(args) > 1, f"{command.name}: group {name!r} has one option"
            for i, first in enumerate(args):
                for second in args[i + 1:]:
                    cases.append(pytest.param(command, first, second,
                                              id=f"{command.name}-{first.dest}-{second.dest}"))
    return cases


@pytest.mark.parametrize("command,first,second", exclusive_cases())
def test_contract_exclusive_options(command, first, second, tmp_path):
    positionals, options = required_args(command)
    given = ["x"] * len(positionals) + [w for _, words in options for w in words]
    words = [[arg.flags[-1]] + ([] if arg.options.get("action") == "store_true" else ["1"])
             for arg in (first, second)]
    assert_error(fp(command.name, *given, *words[0], *words[1], cwd=tmp_path), 2,
                 "not allowed with")
    assert os.listdir(tmp_path) == []


def test_only_pool_given(pool):
    before = file_state(pool)
    checks = Checks()
    for cmd in ["mount", "snapshot", "remove", "resize", "inspect", "map", "discard"]:
        checks.check(cmd, assert_error, fp(cmd, pool), 2, "required")
        checks.check(cmd, assert_equal, file_state(pool), before)
    checks.done()


@pytest.mark.parametrize("extra", [["--no-such-option"], ["extra-argument"]])
def test_unknown_arguments(extra, pool, tmp_path):
    populate(pool)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = pool_state(pool)
    checks = Checks()
    for cmd, args in sorted(POOL_COMMANDS.items()):
        proc = fp(cmd, pool, *fill(args, mnt=mnt), *extra)
        checks.check(cmd, assert_error, proc, 2, "unrecognized")
        checks.check(cmd, assert_equal, (file_state(pool), is_mounted(mnt)), (before["files"], False))
    assert pool_state(pool) == before
    checks.done()


@pytest.mark.parametrize("extra", [["--no-such-option"], ["extra-argument"]])
def test_unknown_arguments_init_umount(extra, tmp_path):
    assert_error(fp("init", tmp_path / "new", *SMALL_POOL, *extra), 2, "unrecognized")
    assert not (tmp_path / "new").exists()
    assert_error(fp("umount", tmp_path, *extra), 2, "unrecognized")


# --- 2. bad input: one clear line, the right status, nothing changed ------------------------------

NAME_256 = "n" * 256
NAME_256_UTF8 = "é" * 128  # 128 characters, 256 bytes

BAD_INPUT = {
    "unknown-volume": [
        ("snapshot", ["snapshot", "nope", "s2"], 1, r"no volume named 'nope'"),
        ("remove", ["remove", "nope"], 1, r"no volume named 'nope'"),
        ("resize", ["resize", "nope", "1G"], 1, r"no volume named 'nope'"),
        ("inspect", ["inspect", "nope"], 1, r"no volume named 'nope'"),
        ("map", ["map", "nope"], 1, r"no volume named 'nope'"),
        ("map-json", ["map", "nope", "--json"], 1, r"no volume named 'nope'"),
        ("discard", ["discard", "nope", "0", "64K"], 1, r"no volume named 'nope'"),
    ],
    "duplicate-name": [
        ("create", ["create", "v"], 1, r"'v' already exists"),
        ("create-snapshot-name", ["create", "s", "--size", "1M"], 1, r"'s' already exists"),
        ("snapshot", ["snapshot", "v", "s"], 1, r"'s' already exists"),
        ("snapshot-onto-origin", ["snapshot", "v", "v"], 1, r"'v' already exists"),
    ],
    "bad-size": [
        *[(f"create --size {s!r}", ["create", "new", "--size", s], 2, r"invalid size")
          for s in ("10X", "-5", "abc")],
        *[(f"resize {s!r}", ["resize", "v", s], 2, r"invalid size|shrink")
          for s in ("10X", "-5", "abc")],
        ("resize '+abc'", ["resize", "v", "+abc"], 2, r"invalid size"),
        *[(f"extend --data-size {s!r}", ["extend", "--data-size", s], 2, r"invalid size")
          for s in ("10X", "-5", "abc")],
        ("extend --metadata-size '10X'", ["extend", "--metadata-size", "10X"], 2, r"invalid size"),
        ("discard offset 'abc'", ["discard", "v", "abc", "64K"], 2, r"invalid size"),
        ("discard length '10X'", ["discard", "v", "0", "10X"], 2, r"invalid size"),
    ],
    "empty-size": [
        ("create --size ''", ["create", "new", "--size", ""], 2, r"invalid size"),
        ("resize ''", ["resize", "v", ""], 2, r"invalid size"),
        ("discard offset ''", ["discard", "v", "", "64K"], 2, r"invalid size"),
        ("extend --data-size ''", ["extend", "--data-size", ""], 2, r"invalid size"),
        ("extend --metadata-size ''", ["extend", "--metadata-size", ""], 2, r"invalid size"),
    ],
    "shrink": [
        ("resize 4M", ["resize", "v", "4M"], 1, r"shrink"),
        ("resize 0", ["resize", "v", "0"], 1, r"shrink"),
        ("extend smaller data", ["extend", "--data-size", "256M"], 1, r"shrink"),
        ("extend smaller metadata", ["extend", "--metadata-size", "32M"], 1, r"shrink"),
    ],
    # `resize POOL v -1G` reads as "shrink by 1G": refused, and the message should say why.
    "resize-negative": [
        ("resize -1G", ["resize", "v", "-1G"], (1, 2), r"shrink"),
        ("resize -- -1G", ["resize", "v", "--", "-1G"], (1, 2), r"shrink"),
        ("resize -1", ["resize", "v", "-1"], (1, 2), r"shrink"),
    ],
    "bad-name": [
        ("create a/b", ["create", "a/b", "--size", "1M"], 2, r"'/'"),
        ("create /abs", ["create", "/abs", "--size", "1M"], 2, r"'/'"),
        ("create 256 bytes", ["create", NAME_256, "--size", "1M"], 2, r"255 bytes"),
        ("create 256 UTF-8 bytes", ["create", NAME_256_UTF8, "--size", "1M"], 2, r"255 bytes"),
        ("create ''", ["create", "", "--size", "1M"], 2, r"invalid volume name"),
        ("create .", ["create", ".", "--size", "1M"], 2, r"invalid volume name"),
        ("create ..", ["create", "..", "--size", "1M"], 2, r"invalid volume name"),
        ("snapshot x/y", ["snapshot", "v", "x/y"], 2, r"'/'"),
        ("snapshot 256 bytes", ["snapshot", "v", NAME_256], 2, r"255 bytes"),
    ],
    "discard-past-end": [  # v is 8 MiB
        ("0+16M", ["discard", "v", "0", "16M"], 1, r"outside the volume"),
        ("8M+1", ["discard", "v", "8M", "1"], 1, r"outside the volume"),
        ("7M+2M", ["discard", "v", "7M", "2M"], 1, r"outside the volume"),
        ("1T+64K", ["discard", "v", "1T", "64K"], 1, r"outside the volume"),
    ],
    "extend-nothing": [
        ("extend", ["extend"], 2, r"nothing to extend"),
    ],
}


@pytest.mark.parametrize("group", sorted(BAD_INPUT))
def test_bad_input(env, group):
    """Each case: the right status and one error line, and the pool files untouched (no commit);
    the whole group: `list --json` and `info --json` figures unchanged."""
    before = pool_state(env.pool)
    checks = Checks()
    for case, args, status, pattern in BAD_INPUT[group]:
        checks.check(case, assert_error, fp(args[0], env.pool, *args[1:]), status, pattern)
        checks.check(case, assert_equal, file_state(env.pool), before["files"])
    assert pool_state(env.pool) == before
    if env.mnt:
        assert sorted(os.listdir(env.mnt)) == ["s", "v"]
        assert os.path.getsize(env.mnt / "v") == 8 * M
    checks.done()


def test_longest_name_is_accepted(env):
    """255 bytes is the limit, not 254: the boundary the bad-name cases stand next to."""
    name = "n" * 255
    assert_ok(fp("create", env.pool, name, "--size", "1M"))
    assert volume(env.pool, name)["size"] == 1 * M
    if env.mnt:
        assert os.path.getsize(env.mnt / name) == 1 * M


def test_discard_up_to_the_end_is_accepted(env):
    assert_ok(fp("discard", env.pool, "v", "4M", "4M"))
    assert volume(env.pool, "v")["mapped_blocks"] == 16


def test_init_bad_sizes(tmp_path):
    """Nothing is created: not even the pool directory."""
    target = tmp_path / "new"
    checks = Checks()
    for option in ["--data-size", "--metadata-size", "--base-size", "--min-free-space"]:
        pattern = r"invalid percentage" if option == "--min-free-space" else r"invalid size"
        for value in ["10X", "-5", "abc", ""]:
            case = f"{option} {value!r}"
            checks.check(case, assert_error, fp("init", target, *SMALL_POOL, option, value), 2, pattern)
            checks.check(case, assert_equal, os.listdir(tmp_path), [])
    checks.done()


def test_init_bad_block_size(tmp_path):
    target = tmp_path / "new"
    checks = Checks()
    for block_size in ["96K", "32K", "2G", "0", "100000", "1536M", "1G+64K"]:
        proc = fp("init", target, *SMALL_POOL, "--block-size", block_size)
        checks.check(block_size, assert_error, proc, 2, r"block size|invalid size")
        checks.check(block_size, assert_equal, os.listdir(tmp_path), [])
    checks.done()


def test_init_into_empty_existing_directory_works(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    assert_ok(fp("init", target, *SMALL_POOL))
    assert fusepool_json("list", target) == []


def test_init_into_non_empty_directory(tmp_path):
    target = tmp_path / "full"
    target.mkdir()
    (target / "precious").write_text("keep me")
    before = file_state(target)
    assert_error(fp("init", target, *SMALL_POOL), 1, r"not empty")
    assert file_state(target) == before


def test_init_over_an_existing_pool(env):
    before = pool_state(env.pool)
    assert_error(fp("init", env.pool, *SMALL_POOL), 1, r"not empty")
    assert pool_state(env.pool) == before


def test_init_onto_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    before = file_state(target)
    assert_error(fp("init", target, *SMALL_POOL), (1, 2), r"not a directory")
    assert file_state(target) == before


# --- POOL that is not a pool ---------------------------------------------------------------------

NOT_A_POOL = r"not a (fusepool )?pool|no such pool"


@pytest.mark.parametrize("kind", ["plain-dir", "missing", "file", "pool-without-config"])
def test_not_a_pool(kind, tmp_path):
    target = tmp_path / "target"
    if kind == "plain-dir":
        target.mkdir()
        (target / "something").write_text("x")
    elif kind == "file":
        target.write_text("not a pool\n")
    elif kind == "pool-without-config":  # a directory holding pool-like files but no pool.json
        target.mkdir()
        (target / "data").write_bytes(b"")
        (target / "metadata").write_bytes(b"")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = file_state(target)
    checks = Checks()
    for cmd, args in sorted(POOL_COMMANDS.items()):
        proc = fp(cmd, target, *fill(args, mnt=mnt), timeout=30)
        checks.check(cmd, assert_error, proc, 1, NOT_A_POOL)
        checks.check(cmd, assert_equal, file_state(target), before)
        checks.check(cmd, assert_equal, (is_mounted(mnt), os.listdir(mnt)), (False, []))
    checks.done()


# --- umount ------------------------------------------------------------------------------------

def test_umount_not_mounted(env, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("x")
    before = pool_state(env.pool)
    checks = Checks()
    for target in (tmp_path / "plain", tmp_path / "missing", env.pool, tmp_path / "file"):
        proc = fp("umount", target)
        checks.check(target.name, assert_error, proc, 1, r"not a fusepool mount|no such|not mounted")
    assert pool_state(env.pool) == before
    if env.mnt:
        assert is_mounted(env.mnt)
        assert sorted(os.listdir(env.mnt)) == ["s", "v"]
    checks.done()


def test_umount_a_foreign_mount(tmp_path):
    """A mount point that is not fusepool's (a tmpfs) is refused and left alone."""
    if os.getuid():
        pytest.skip("needs root to mount a tmpfs")
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], check=True)
    try:
        assert_error(fp("umount", target), 1, r"not a fusepool mount")
        assert is_mounted(target)
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


# --- mount errors ----------------------------------------------------------------------------

def assert_pool_free(pool, name="after-failed-mount") -> None:
    """The pool is not locked and has no daemon: an offline command works."""
    assert "control.sock" not in os.listdir(pool)
    assert_ok(fp("create", pool, name, "--size", "1M", timeout=30))
    assert volume(pool, name)["size"] == 1 * M


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_mount_onto_bad_mountpoint(pool, tmp_path, kind):
    populate(pool)
    target = tmp_path / kind
    if kind == "file":
        target.write_text("x")
    before = pool_state(pool)
    line = assert_error(fp("mount", pool, target, timeout=30), (1, 2),
                        r"not a directory" if kind == "file" else r"no such file")
    assert str(target) in line
    assert not is_mounted(target)
    assert (target.exists()) == (kind == "file")
    after = pool_state(pool)
    after["files"].pop("fusepool.log", None)  # the daemon may have logged why it stopped
    before["files"].pop("fusepool.log", None)
    assert after == before
    assert_pool_free(pool)


def test_mount_onto_a_mount_point(pool, make_pool, make_mount):
    """Another pool's mount point is taken; the failed mount leaves both pools alone."""
    populate(pool)
    m = make_mount(pool)
    other = make_pool("other")
    assert_error(fp("mount", other, m.mountpoint, timeout=30), (1, 2), r"already a mount point|mounted")
    assert sorted(os.listdir(m.mountpoint)) == ["s", "v"]
    assert_pool_free(other)


def test_mount_same_pool_twice(pool, make_mount, tmp_path):
    populate(pool)
    m = make_mount(pool)
    data = (m.mountpoint / "v").read_bytes()
    before = pool_state(pool)
    second = tmp_path / "second"
    second.mkdir()
    for target in (second, m.mountpoint):
        line = assert_error(fp("mount", pool, target, timeout=30), 1, r"already mounted")
        assert str(m.mountpoint) in line
    assert not is_mounted(second)
    assert os.listdir(second) == []
    assert pool_state(pool) == before
    assert (m.mountpoint / "v").read_bytes() == data  # the first mount still serves


# --- 3. a pool held by another process --------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from fusepool.engine import Pool
    p = Pool.open(sys.argv[1])
    print("ready", flush=True)
    time.sleep(30)
""")

BUSY_COMMANDS = {**POOL_COMMANDS, "list-json": ["--json"], "info-json": ["--json"],
                 "map-json": ["v", "--json"]}


@pytest.fixture
def held_pool(pool):
    populate(pool)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(pool)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield pool
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_busy_pool(held_pool, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = file_state(held_pool)
    before.pop("fusepool.log", None)  # a failed background mount may log why
    checks = Checks()
    for cmd, args in sorted(BUSY_COMMANDS.items()):
        start = time.monotonic()
        try:
            proc = fp(cmd.removesuffix("-json"), held_pool, *fill(args, mnt=mnt), timeout=20)
        except subprocess.TimeoutExpired:
            checks.failures.append(f"[{cmd}] hung on a busy pool")
            continue
        elapsed = time.monotonic() - start
        checks.check(cmd, assert_error, proc, 1, r"busy")
        checks.check(cmd, assert_equal, (elapsed < 10, is_mounted(mnt)), (True, False))
        after = file_state(held_pool)
        after.pop("fusepool.log", None)
        checks.check(cmd, assert_equal, after, before)
    checks.done()


def test_busy_pool_is_free_again_after_holder_exits(pool):
    populate(pool)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(pool)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert_error(fp("list", pool), 1, r"busy")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert [v["name"] for v in fusepool_json("list", pool)] == ["s", "v"]


# --- 4. output formats ------------------------------------------------------------------------------

def test_list_json(env):
    vols = fusepool_json("list", env.pool)
    assert isinstance(vols, list)
    assert [v["name"] for v in vols] == ["s", "v"]
    for v in vols:
        assert set(v) >= LIST_KEYS, set(v)
        assert isinstance(v["dev_id"], int) and 1 <= v["dev_id"] < 1 << 24
        for key in ("size", "mapped_blocks", "exclusive_blocks", "shared_blocks"):
            assert isinstance(v[key], int) and v[key] >= 0
        assert v["mapped_blocks"] == v["exclusive_blocks"] + v["shared_blocks"]
        assert v["size"] == 8 * M
    s, v = vols
    assert v["origin"] is None
    assert s["origin"] == "v"
    assert s["dev_id"] != v["dev_id"]
    # 17 blocks were written before the snapshot; block 0 of v was rewritten after it.
    assert v["mapped_blocks"] == s["mapped_blocks"] == 17
    assert v["exclusive_blocks"] == s["exclusive_blocks"] == 1
    assert v["shared_blocks"] == s["shared_blocks"] == 16
    # the table
    lines = assert_ok(fp("list", env.pool)).stdout.splitlines()
    assert lines[0].split() == ["NAME", "DEV_ID", "SIZE", "MAPPED", "EXCLUSIVE", "SHARED", "ORIGIN"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"s", "v"}
    assert rows["s"][-1] == "v" and rows["v"][-1] == "-"


def test_repair_refuses_a_mounted_pool(pool, make_mount):
    """repair rewrites the metadata under the daemon's feet: refused while mounted."""
    m = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "1M")
    with open(m.vol("v"), "r+b") as f:
        f.write(b"kept")
        os.fsync(f.fileno())
    assert_error(fp("repair", pool), 1, f"mounted at {re.escape(str(m.mountpoint))}.*unmount it")
    assert is_mounted(m.mountpoint)
    with open(m.vol("v"), "rb") as f:
        assert f.read(4) == b"kept"
    assert [v["name"] for v in fusepool_json("list", pool)] == ["v"]


def test_list_json_empty_pool(pool):
    assert fusepool_json("list", pool) == []
    proc = assert_ok(fp("list", pool))
    assert proc.stdout.split() == ["NAME", "DEV_ID", "SIZE", "MAPPED", "EXCLUSIVE", "SHARED", "ORIGIN"]


def test_online_and_offline_listings_agree(pool, make_mount):
    populate(pool)
    offline_list, offline_info = fusepool_json("list", pool), fusepool_json("info", pool)
    m = make_mount(pool)
    online_list, online_info = fusepool_json("list", pool), fusepool_json("info", pool)
    assert online_list == offline_list
    assert online_info["mounted"] == str(m.mountpoint) and offline_info["mounted"] is None
    for key in STABLE_INFO:
        if key != "mounted":
            assert online_info[key] == offline_info[key], key


@pytest.mark.parametrize("data_size, block_size", [
    (100 * M + 12345, 512 * K), (512 * M, 64 * K), (1 * G + 1, 1 * M), (300 * M - 1, 2 * M)])
def test_info_json_exact_bytes(tmp_path, data_size, block_size):
    pool = tmp_path / "p"
    assert_ok(fp("init", pool, "--data-size", str(data_size), "--metadata-size", "64M",
                 "--block-size", str(block_size)))
    info = fusepool_json("info", pool)
    assert info["block_size"] == block_size
    assert info["data_space_total"] == data_size // block_size * block_size
    assert info["data_blocks_total"] == data_size // block_size
    assert info["data_space_used"] == 0 and info["data_blocks_used"] == 0
    assert info["metadata_space_total"] == 64 * M
    assert 0 < info["metadata_space_used"] < 64 * M
    assert info["base_size"] == 10 * G
    assert info["volume_count"] == 0
    assert info["mounted"] is None
    for key in ("data_space_total", "data_space_used", "data_space_available", "metadata_space_total",
                "metadata_space_used", "metadata_space_available", "min_free_space"):
        assert isinstance(info[key], int), key
    assert info["min_free_space"] == info["data_space_total"] // 10


def test_info(env):
    info = fusepool_json("info", env.pool)
    assert info["data_blocks_used"] == 18  # 17 shared by v and s, plus v's rewritten block 0
    assert info["data_space_used"] == 18 * BS
    assert info["volume_count"] == 2
    assert info["mounted"] == (str(env.mnt) if env.mnt else None)
    # Docker's `docker info` block
    text = assert_ok(fp("info", env.pool)).stdout
    lines = text.splitlines()
    assert lines[0] == "Storage Driver: fusepool"
    fields = dict(line.strip().split(": ", 1) for line in lines[1:])
    assert fields["Pool Blocksize"] == "65.54 kB"
    assert fields["Base Device Size"] == "10.74 GB"
    assert fields["Data Space Total"] == "536.9 MB"
    assert fields["Data Space Used"] == f"{18 * BS / 1e6:.4g} MB"
    assert fields["Metadata Space Total"] == "67.11 MB"
    for name in ("Pool Name", "Backing Filesystem", "Data file", "Metadata file", "Data Space Available",
                 "Metadata Space Used", "Metadata Space Available", "Thin Pool Minimum Free Space",
                 "Deferred Removal Enabled", "Deferred Deletion Enabled",
                 "Deferred Deleted Device Count", "Library Version"):
        assert name in fields, name
    assert fields["Data file"] == str(env.pool / "data")
    assert fields["Metadata file"] == str(env.pool / "metadata")


def test_inspect(env):
    out = json.loads(assert_ok(fp("inspect", env.pool, "v")).stdout)
    assert out["Name"] == "fusepool"
    data = out["Data"]
    assert data["DeviceName"] == "v"
    assert data["DeviceSize"] == str(8 * M)
    assert data["DeviceId"] == str(volume(env.pool, "v")["dev_id"])
    assert all(isinstance(data[k], str) for k in ("DeviceId", "DeviceName", "DeviceSize"))


def test_map_json(env):
    for name in ("v", "s"):
        extents = fusepool_json("map", env.pool, name)
        assert isinstance(extents, list)
        for e in extents:
            assert {"offset", "length", "virtual_block", "data_block", "blocks", "shared"} <= set(e)
            assert e["offset"] == e["virtual_block"] * BS
            assert e["length"] == e["blocks"] * BS
            assert e["blocks"] >= 1
            assert isinstance(e["shared"], bool)
        assert sum(e["blocks"] for e in extents) == 17
        covered = [(e["virtual_block"] + i, e["shared"]) for e in extents for i in range(e["blocks"])]
        assert covered == [(0, False)] + [(vb, True) for vb in range(1, 16)] + [(64, True)]
    v_blocks = {e["virtual_block"]: e["data_block"] for e in fusepool_json("map", env.pool, "v")}
    s_blocks = {e["virtual_block"]: e["data_block"] for e in fusepool_json("map", env.pool, "s")}
    assert v_blocks[0] != s_blocks[0]  # block 0 was copied on write
    assert v_blocks[64] == s_blocks[64]  # shared blocks point at the same data block
    # the table
    lines = assert_ok(fp("map", env.pool, "v")).stdout.splitlines()
    assert lines[0].split() == ["OFFSET", "LENGTH", "VIRTUAL_BLOCK", "DATA_BLOCK", "BLOCKS", "STATE"]
    assert {line.split()[-1] for line in lines[1:]} == {"shared", "exclusive"}


def test_map_of_empty_volume(pool):
    assert_ok(fp("create", pool, "e", "--size", "1G"))
    assert fusepool_json("map", pool, "e") == []


SIZE_FORMS = [("512K", 512 * K), ("64K", 64 * K), ("10G", 10 * G), ("1T", T), ("123456789", 123456789),
              ("65536", 64 * K), ("1", 1), ("0", 0), ("512k", 512 * K), ("3M", 3 * M), ("1P", 1 << 50)]


def test_size_suffixes(env):
    """Thin: a 1 TiB (even 1 PiB) volume in a 512 MiB pool is fine; create allocates nothing."""
    for i, (text, _) in enumerate(SIZE_FORMS):
        assert_ok(fp("create", env.pool, f"sized{i}", "--size", text))
    vols = {v["name"]: v for v in fusepool_json("list", env.pool)}
    for i, (text, size) in enumerate(SIZE_FORMS):
        assert (text, vols[f"sized{i}"]["size"]) == (text, size)
        assert vols[f"sized{i}"]["mapped_blocks"] == 0
        if env.mnt:
            assert os.path.getsize(env.mnt / f"sized{i}") == size
    inspect = json.loads(assert_ok(fp("inspect", env.pool, "sized3")).stdout)
    assert inspect["Data"]["DeviceSize"] == str(T)
    assert fusepool_json("info", env.pool)["data_blocks_used"] == 18


def test_resize_forms(env):
    for text, size in [("8M", 8 * M), ("16M", 16 * M), ("+1M", 17 * M), ("18874368", 18 * M),
                       ("+0", 18 * M), ("1T", T), ("+1G", T + G)]:
        assert_ok(fp("resize", env.pool, "v", text))
        assert (text, volume(env.pool, "v")["size"]) == (text, size)
        if env.mnt:
            assert os.path.getsize(env.mnt / "v") == size
    assert volume(env.pool, "s")["size"] == 8 * M  # the snapshot keeps its own size


@pytest.mark.parametrize("block_size", ["64K", "512K", "131072", "1G"])
def test_init_block_sizes(tmp_path, block_size):
    from fusepool.units import parse_size

    pool = tmp_path / "p"
    assert_ok(fp("init", pool, "--data-size", "4G", "--metadata-size", "64M", "--block-size", block_size))
    info = fusepool_json("info", pool)
    assert info["block_size"] == parse_size(block_size)
    assert info["data_space_total"] == 4 * G


def test_default_size_is_base_size(tmp_path):
    pool = tmp_path / "p"
    assert_ok(fp("init", pool, *SMALL_POOL, "--base-size", "3G"))
    assert_ok(fp("create", pool, "d"))
    assert volume(pool, "d")["size"] == 3 * G


def test_successful_commands_print_to_stdout_only(env):
    for args in (["create", "n", "--size", "1M"], ["snapshot", "n", "n2"], ["resize", "n", "2M"],
                 ["discard", "n", "0", "1M"], ["remove", "n2"], ["extend", "--data-size", "1G"]):
        proc = assert_ok(fp(args[0], env.pool, *args[1:]))
        assert proc.stdout.strip(), args
    assert [v["name"] for v in fusepool_json("list", env.pool)] == ["n", "s", "v"]
    assert fusepool_json("info", env.pool)["data_space_total"] == 1 * G
