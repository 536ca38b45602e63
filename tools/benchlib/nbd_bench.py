"""tools/bench-nbd's method: fusepool's NBD export against qemu-storage-daemon's NBD export of a
qcow2 image, driven by fio's nbd engine (libnbd), both over a unix socket on this machine.

Each repeat runs every workload on both targets, one after the other, and the ratios are
taken inside one run (absolute figures on a shared machine swing; ratios hold better).
"""

import json
import os
import statistics
import subprocess
import time

from benchlib.env import MiB, fusepool_command, run_fusepool, say

# (name, fio arguments, the figure): the volume is written in full by the first one, so the
# random writes overwrite (the common case of a disk image) and the reads read data.
WORKLOADS = [
    ("seq 1 MiB write (fresh)", ["--rw=write", "--bs=1M", "--end_fsync=1"], "write_bw"),
    ("rand 4 KiB write", ["--rw=randwrite", "--bs=4k", "--time_based", "--end_fsync=1"], "write_iops"),
    ("seq 1 MiB read", ["--rw=read", "--bs=1M"], "read_bw"),
    ("rand 4 KiB read", ["--rw=randread", "--bs=4k", "--time_based"], "read_iops"),
]


class FusepoolNbd:
    """`fusepool serve POOL --nbd unix:SOCK` with one volume, ``v``."""

    name = "fusepool"

    def __init__(self, work: str, size: int):
        self.pool = os.path.join(work, "pool")
        self.sock = os.path.join(work, "fp.sock")
        run_fusepool("init", self.pool, "--data-size", str(2 * size + 256 * MiB), "--metadata-size", "256M")
        run_fusepool("create", self.pool, "v", "--size", str(size))
        run_fusepool("serve", self.pool, "--nbd", f"unix:{self.sock}")
        self.uri = f"nbd+unix:///v?socket={self.sock}"

    def stop(self) -> None:
        subprocess.run([*fusepool_command(), "stop", self.pool, "--force"], capture_output=True)


class QemuNbd:
    """qemu-storage-daemon exporting a qcow2 image (qemu-img create defaults) over NBD."""

    name = "qemu-storage-daemon qcow2"

    def __init__(self, work: str, size: int, qsd: str):
        image = os.path.join(work, "img.qcow2")
        self.sock = os.path.join(work, "qsd.sock")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(size)], check=True)
        self.proc = subprocess.Popen([
            qsd, "--blockdev", f"driver=file,node-name=file,filename={image}",
            "--blockdev", "driver=qcow2,node-name=qcow2,file=file",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", "type=nbd,id=exp,node-name=qcow2,name=v,writable=on"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.05)
        self.uri = f"nbd+unix:///v?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def fio(uri: str, args: list[str], size: int, runtime: float, iodepth: int) -> dict:
    cmd = ["fio", "--output-format=json", "--name=job", "--ioengine=nbd", f"--uri={uri}",
           f"--size={size}", f"--runtime={runtime:g}", f"--iodepth={iodepth}",
           "--random_generator=lfsr", "--randrepeat=0", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return {"write_bw": job["write"]["bw_bytes"] / MiB, "write_iops": job["write"]["iops"],
            "read_bw": job["read"]["bw_bytes"] / MiB, "read_iops": job["read"]["iops"]}


def run(work: str, size: int, runtime: float, repeats: int, iodepth: int, qsd: str) -> dict:
    samples: dict[str, dict[str, list[float]]] = {w[0]: {"fusepool": [], "qemu": []} for w in WORKLOADS}
    for repeat in range(repeats):
        for key, make in (("fusepool", lambda d: FusepoolNbd(d, size)),
                          ("qemu", lambda d: QemuNbd(d, size, qsd))):
            target_dir = os.path.join(work, f"{key}-{repeat}")
            os.makedirs(target_dir)
            target = make(target_dir)
            try:
                for name, args, figure in WORKLOADS:
                    value = fio(target.uri, args, size, runtime, iodepth)[figure]
                    samples[name][key].append(value)
                    say(f"repeat {repeat + 1}/{repeats} {target.name}: {name}: {value:,.0f}")
            finally:
                target.stop()
    rows = []
    for name, _args, figure in WORKLOADS:
        mine = statistics.median(samples[name]["fusepool"])
        theirs = statistics.median(samples[name]["qemu"])
        rows.append({"workload": name, "unit": "MiB/s" if figure.endswith("bw") else "IOPS",
                     "fusepool": mine, "qemu": theirs, "ratio": mine / theirs if theirs else None,
                     "samples": samples[name]})
    return {"size": size, "runtime": runtime, "repeats": repeats, "iodepth": iodepth, "rows": rows}


def print_report(res: dict) -> None:
    print(f"fusepool NBD vs qemu-storage-daemon NBD (qcow2), fio ioengine=nbd iodepth={res['iodepth']}, "
          f"{res['size'] // MiB} MiB volume, median of {res['repeats']}")
    print(f"{'workload':28} {'unit':6} {'fusepool':>10} {'qemu qcow2':>11} {'x qemu':>7}")
    for r in res["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(f"{r['workload']:28} {r['unit']:6} {r['fusepool']:10,.0f} {r['qemu']:11,.0f} {ratio:>7}")
