"""The shell scripts and the Vagrantfile, checked statically here.

What the provisioning scripts in vagrant/ build is tested for real in
tests/test_kernel_vm.py (they run unchanged in the kernel VM); here shellcheck
checks every shell script of the project, and Vagrant itself validates
vagrant/Vagrantfile (no hypervisor needed).  shellcheck, vagrant and
vagrant-libvirt come with tools/setup: if one is missing, the tests fail.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VAGRANT_DIR = ROOT / "vagrant"
SHEBANG = re.compile(rb"#!\s*(/usr)?/bin/(env\s+)?(sh|bash|dash)\b")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".vagrant", "node_modules"}


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed: apt-get install {package} (tools/setup does)"
    return path


def shell_scripts() -> list[Path]:
    """Every file of the project that is a shell script: *.sh, or a sh/bash/dash shebang."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            with open(path, "rb") as f:
                head = f.read(64)
            if name.endswith(".sh") or SHEBANG.match(head):
                found.append(path)
    return found


def test_every_shell_script_passes_shellcheck():
    shellcheck = need("shellcheck", "shellcheck")
    scripts = shell_scripts()
    names = {str(p.relative_to(ROOT)) for p in scripts}
    # the discovery really finds them (a test that checks nothing would pass)
    assert {"vagrant/direct-lvm.sh", "vagrant/loop-lvm.sh", "vagrant/lib.sh", "tools/setup",
            ".ci/run"} <= names, names
    # -x: follow the `. lib.sh` of the vagrant scripts (their directives point at it)
    proc = subprocess.run([shellcheck, "-x", *map(str, scripts)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, f"shellcheck on {' '.join(sorted(names))}:\n{proc.stdout}{proc.stderr}"


def test_shellcheck_catches_a_bad_script(tmp_path):
    """The check above has teeth: an unquoted variable in a POSIX script is reported."""
    shellcheck = need("shellcheck", "shellcheck")
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/bin/sh\nset -eu\nrm -f $1\n[[ -e x ]]\n')
    proc = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout and "SC3010" in proc.stdout, proc.stdout


def test_vagrant_scripts_are_posix_sh_and_executable():
    """The same scripts run under dash in tools/kernel-vm: #!/bin/sh, set -eu, executable."""
    scripts = sorted(VAGRANT_DIR.glob("*.sh"))
    assert len(scripts) >= 8
    for path in scripts:
        text = path.read_text()
        if path.name == "lib.sh":  # sourced, never run
            assert text.startswith("# shellcheck shell=sh\n") and not os.access(path, os.X_OK)
            continue
        assert text.startswith("#!/bin/sh\n"), path
        assert "\nset -eu\n" in text, path
        assert os.access(path, os.X_OK), f"{path} is not executable"
        proc = subprocess.run(["dash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def test_vagrantfile_runs_scripts_that_exist():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    mentioned = set(re.findall(r"[\w-]+\.sh", text))
    assert {"bench-fs.sh", "direct-lvm.sh", "loop-lvm.sh", "install-fusepool.sh", "compare.sh",
            "loop-lvm-teardown.sh", "direct-lvm-teardown.sh", "bench-fs-teardown.sh"} <= mentioned
    for name in mentioned:
        assert os.access(VAGRANT_DIR / name, os.X_OK), f"the Vagrantfile runs {name}: not in vagrant/"


def vagrant_validate(directory: Path, tmp_path: Path, *args, provider=None) -> subprocess.CompletedProcess:
    """``vagrant validate`` in ``directory``, with Vagrant's state kept under tmp_path."""
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    if provider:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    return subprocess.run([need("vagrant", "vagrant"), "validate", *args], capture_output=True,
                          text=True, cwd=directory, env=env, timeout=120)


@pytest.mark.parametrize("how", ["--ignore-provider", "libvirt"])
def test_vagrantfile_validates(tmp_path, how):
    """Without a provider (--ignore-provider), and with the libvirt provider's own checks
    (vagrant-libvirt validates its block; VirtualBox is not packaged in Debian)."""
    if how == "libvirt":
        proc = vagrant_validate(VAGRANT_DIR, tmp_path, provider="libvirt")
    else:
        proc = vagrant_validate(VAGRANT_DIR, tmp_path, how)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Vagrantfile validated successfully" in proc.stdout
    assert not (VAGRANT_DIR / ".vagrant").exists()  # nothing written into the checkout


@pytest.mark.parametrize("typo, error", [
    ('inline: "#{SCRIPTS}/#{script}"', "The following settings shouldn't exist: inlin"),
    ("libvirt.memory = MEMORY_MB", "The following settings shouldn't exist: memroy"),
])
def test_vagrant_validate_catches_a_broken_vagrantfile(tmp_path, typo, error):
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert typo in text
    broken = text.replace(typo, typo.replace("inline:", "inlin:").replace("memory =", "memroy ="))
    (tmp_path / "vagrant").mkdir()
    (tmp_path / "vagrant" / "Vagrantfile").write_text(broken)
    proc = vagrant_validate(tmp_path / "vagrant", tmp_path, provider="libvirt")
    assert proc.returncode != 0
    assert error in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("script, env, error", [
    ("install-fusepool.sh", {"FUSEPOOL_DIR": "/nonexistent"},
     "/nonexistent/tools/setup not found: set FUSEPOOL_DIR to the checkout"),
    ("compare.sh", {"DIRECT_LVM_VG": "no-such-vg"}, "no /dev/no-such-vg/bench: run direct-lvm.sh first"),
    ("direct-lvm.sh", {"THIN_VOLUME_SIZE": "12 parsecs"}, "bad size '12 parsecs' (e.g. 512M, 10G)"),
    ("loop-lvm.sh", {"LOOP_LVM_DATA_SIZE": "1.5G"}, "bad size '1.5G' (e.g. 512M, 10G)"),
    ("bench-fs.sh", {"BENCH_DISK": "/nonexistent", "BENCH_DIR": "/nonexistent-dir"},
     "/nonexistent: not a block device"),
])
def test_scripts_refuse_bad_settings_with_one_line(script, env, error):
    """Run on this host (no device-mapper needed: they stop before touching anything)."""
    path = VAGRANT_DIR / script
    if os.getuid() != 0 and "bad size" not in error:  # sizes are checked first
        error = f"run me as root (sudo {path})"
    proc = subprocess.run([str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FUSEPOOL_DIR": str(ROOT), **env})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"{script}: {error}"], proc.stderr
