"""The machine and the commands the benchmarks run: fusepool's CLI, external tools, progress lines.

Every tool in tools/ that measures something names itself once (``set_tool``) so that the
progress lines of these shared helpers carry its name.
"""

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SPACE_MARGIN = 1 * GiB  # free space kept on top of what a benchmark writes
START = time.monotonic()
_tool = "bench"


class Refused(Exception):
    """Bad input found before anything was made: one line, exit status 2."""


def set_tool(name: str) -> None:
    """The name progress lines and error messages start with."""
    global _tool
    _tool = name


def say(message: str) -> None:
    print(f"{_tool} [{time.monotonic() - START:6.1f}s]: {message}", file=sys.stderr, flush=True)


def ensure_fusepool_importable(script: str, reexec_var: str) -> None:
    """Re-run ``script`` under the repository's venv when this python lacks fusepool."""
    try:
        import fusepool  # noqa: F401
    except ImportError:
        venv_python = REPO / ".venv" / "bin" / "python"
        if venv_python.exists() and not os.environ.get(reexec_var):
            os.environ[reexec_var] = "1"
            os.execv(venv_python, [str(venv_python), str(Path(script).resolve()), *sys.argv[1:]])
        sys.exit(f"{_tool}: cannot import fusepool; run tools/setup, then .venv/bin/python tools/{_tool}")


def find_tool(name: str) -> str | None:
    """An external program's path: on PATH, or in the system directories a user's PATH may lack."""
    return shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/sbin", "/usr/bin")
                                       if os.access(f"{d}/{name}", os.X_OK)), None)


DEBIAN_PACKAGE = {"fio": "fio", "qemu-img": "qemu-utils", "qemu-storage-daemon": "qemu-system-common"}


def fusepool_command() -> list[str]:
    """The installed `fusepool` console script next to this python, as users run it."""
    beside = Path(sys.executable).parent / "fusepool"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fusepool")
    return [found] if found else [sys.executable, "-m", "fusepool"]


def find_tools() -> tuple[dict[str, str | None], list[str]]:
    """External tools by name (None when missing) and what their absence skips."""
    tools = {name: find_tool(name) for name in DEBIAN_PACKAGE}
    skipped = []
    if not tools["fio"]:
        skipped.append("every fio target: fio is not installed (Debian package fio)")
    for name in ("qemu-img", "qemu-storage-daemon"):
        if not tools[name]:
            skipped.append(f"the qcow2 targets: {name} is not installed (Debian package "
                           f"{DEBIAN_PACKAGE[name]})")
    return tools, skipped


def fatal_requirements() -> list[str]:
    """What makes any measurement of fusepool impossible (nothing is installed here)."""
    missing = []
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse is missing: FUSE is not available on this machine")
    if os.getuid() != 0 and not shutil.which("fusermount3"):
        missing.append("fusermount3 is not installed (Debian package fuse3)")
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        missing.append("pyfuse3 is not importable from this python: run tools/setup and use .venv/bin/python")
    return missing


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine_info(work_dir: str, tools: dict) -> dict:
    import pyfuse3
    import trio

    from fusepool import __version__
    from fusepool.engine import host_filesystem

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    os_name = "unknown"
    try:
        with open("/etc/os-release") as f:
            os_name = next((line.split("=", 1)[1].strip().strip('"') for line in f
                            if line.startswith("PRETTY_NAME=")), os_name)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "fusepool": __version__,
                "pyfuse3": pyfuse3.__version__, "trio": trio.__version__,
                "libfuse3": first_line(["dpkg-query", "-W", "-f", "${Version}\n", "libfuse3-3"])}
    if tools["fio"]:
        versions["fio"] = first_line([tools["fio"], "--version"])
    for name in ("qemu-storage-daemon", "qemu-img"):
        if tools[name]:
            versions[name] = first_line([tools[name], "--version"]).replace(f"{name} version ", "")
    commit = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / (1 << 20), 1),
        "os": os_name, "kernel": platform.release(), "versions": versions, "commit": commit,
        "dir": work_dir, "dir_filesystem": host_filesystem(work_dir), "root": os.getuid() == 0,
        "env": {k: v for k, v in os.environ.items() 
                if k.startswith("FUSEPOOL_") and not k.endswith("_REEXEC")},
    }


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False when we may not (not root)."""
    os.sync()
    if os.getuid() != 0:
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def vm_rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_fusepool(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*fusepool_command(), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"fusepool {' '.join(map(str, args))} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()}")
    return proc


def time_command(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed


# --- options shared by the tools ------------------------------------------------------------


def preset_name(p, args) -> str:
    """The preset --quick / --smoke choose ("default" without either); both at once is a usage error."""
    if args.quick and args.smoke:
        p.error("--quick and --smoke exclude each other")
    return "smoke" if args.smoke else "quick" if args.quick else "default"


def size_option(p, text: str | None, default: int) -> int:
    """--size in bytes: fusepool's size syntax, a whole number of MiB, at least 4M (else p.error)."""
    from fusepool.errors import UsageError
    from fusepool.units import parse_size

    try:
        size = default if text is None else parse_size(text)
    except UsageError as exc:
        p.error(str(exc))
    if size < 4 * MiB or size % MiB:
        p.error("--size must be a whole number of MiB, at least 4M")
    return size
