"""tools/bench's report: the text tables on stdout and the --chart PNG."""

import statistics
import textwrap

from .bench_parts import PLAIN_MIN_RATIO, QCOW2_MIN_RATIO, TARGET_BLOCKS
from .env import GiB, MiB
from .report import median_ms, ms, num, percentile, print_table, verdict
from .workloads import UNIT_FIGURE


def report_reporting(r: dict) -> None:
    p = r["pool"]
    print()
    print(f"engine, reporting at Docker scale: a base of {p['blocks']:,} blocks and a chain of "
          f"{p['layers']:,} snapshots (built in {p['build_s']:.1f} s), CLI on the unmounted pool, "
          f"median of {len(r['times_s']['list'])}; dump output {r['dump_bytes'] / MiB:,.1f} MiB")
    checks = {c["figure"]: c for c in r["checks"]}
    rows = [("command", "median", "target", "")]
    for key, times in r["times_s"].items():
        c = checks.get(f"report_{key}_s")
        rows.append((key, median_ms(times), c["target"] if c else "",
                     ("ok" if c["ok"] else "MISSED") if c else ""))
    print_table(rows, "lrll")


def report_text(res: dict) -> None:
    m, cfg = res["machine"], res["config"]
    print(f"fusepool bench: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, {m['os']}, "
          f"kernel {m['kernel']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"commit: {m['commit']}")
    print(f"command: {res['command']}")
    print(f"work dir: {m['dir']} ({m['dir_filesystem']})")
    print(f"load average (1/5/15 min): {res['load_before']} before, {res['load_after']} after")
    if m["env"]:
        print("environment: " + " ".join(f"{k}={v}" for k, v in m["env"].items()))
    print("page cache: " + ("dropped before every run but the warm read" if cfg["caches_dropped"]
                            else "NOT dropped (not root): cold figures may come from memory"))
    for s in res["skipped"]:
        print(f"skipped: {s}")
    if "fio" in res:
        fio = res["fio"]
        labels = {t["key"]: t["label"] for t in fio["targets"]}
        print()
        print(f"fio: psync, 1 job, buffered, {cfg['size'] / MiB:,.0f} MiB files, "
              f"runtime {cfg['runtime']:g} s, "
              f"median of {cfg['repeats']}; x-qcow2 and x-plain divide the MB/s (seq) or IOPS (rand, mixed)")
        rows = [("workload / target", "mode", "MB/s", "IOPS", "p50 us", "p99 us", "x-qcow2", "x-plain",
                 "target")]
        for w in fio["workloads"]:
            rows.append((w["label"], "", "", "", "", "", "", "", ""))
            unit = UNIT_FIGURE[w["unit"]]
            for row in (r for r in fio["rows"] if r["workload"] == w["key"]):
                med = row["median"]
                rows.append((f"  {labels[row['target']]}", row["mode"], num(med["mb_s"], 1), num(med["iops"]),
                             num(med["p50_us"], 1), num(med["p99_us"], 1),
                             num(row["ratio_qcow2"] and row["ratio_qcow2"][unit], 2),
                             num(row["ratio_plain"] and row["ratio_plain"][unit], 2),
                             verdict(row["checks"]) if row["checks"] else "-"))
        print_table(rows, "llrrrrrrl")
    if "engine" in res:
        e = res["engine"]
        big = e["blocks"]
        print()
        print(f"engine: median of {cfg['snapshot_samples']} snapshots / {cfg['repeats']} mounts; fsync: "
              f"p50 and p99 of {cfg['fsync_samples']} samples; pool of {big:,} blocks: "
              f"{e['snapshot'][-1]['pool']['data_size'] / GiB:,.0f} GiB data, 64 KiB blocks")
        checks = {c["figure"]: c for c in e["checks"]}

        def check(figure: str) -> str:
            c = checks.get(figure)
            return "-" if c is None else ("ok" if c["ok"] else "MISSED")

        def target(figure: str) -> str:
            c = checks.get(figure)
            return "" if c is None else c["target"]

        rows = [("figure", "p50/median", "p99", "target", "")]
        for s in e["snapshot"]:
            fig = "snapshot_s" if s["blocks"] == big else ""
            rows.append((f"Pool.snapshot, {s['blocks']:,} mapped blocks", ms(s["median_s"]), "", target(fig),
                         check(fig)))
        if "snapshot_growth" in checks:
            c = checks["snapshot_growth"]
            rows.append((f"  {big:,} / 1,000 blocks", f"{c['value']:.2f}x", "", c["target"],
                         check("snapshot_growth")))
        rows.append((f"`fusepool snapshot` (mounted, {big:,} blocks)", median_ms(e["cli_snapshot_s"]),
                     "", target("cli_snapshot_s"), check("cli_snapshot_s")))
        rows.append(("  `fusepool --version` (any command's floor)", median_ms(e["cli_version_s"]),
                     "", "", ""))
        if "qemu_img_snapshot_s" in e:
            rows.append(("  `qemu-img create -b` (qcow2's snapshot)", median_ms(e["qemu_img_snapshot_s"]),
                         "", "", ""))
        rows.append((f"`fusepool mount`, {big:,} mappings", median_ms(e["mount"]["mount_warm_s"]),
                     "", target("mount_s"), check("mount_s")))
        if e["mount"]["mount_cold_s"]:
            rows.append(("  same, page cache dropped first", median_ms(e["mount"]["mount_cold_s"]),
                         "", "", ""))
        rows.append(("  empty pool, same geometry", median_ms(e["mount_empty"]["mount_warm_s"]),
                     "", "", ""))
        rss = statistics.median(e["rss_bytes_per_block"])
        rows.append(("resident memory per mapped block", f"{rss:.1f} B",
                     "", target("rss_bytes_per_block"), check("rss_bytes_per_block")))
        rows.append(("  daemon VmRSS: pool / empty pool",
                     f"{statistics.median(e['mount']['rss_bytes']) / MiB:,.1f} MiB",
                     f"{statistics.median(e['mount_empty']['rss_bytes']) / MiB:,.1f} MiB", "", ""))
        for where, label in (("fsync_engine", "pool.sync(), {} dirty mappings"),
                             ("fsync_mount", "os.fsync through the mount, {} 4 KiB CoW writes")):
            for dirty, times in e[where].items():
                fig = where if dirty == "1000" else ""
                rows.append((label.format(f"{int(dirty):,}"), ms(percentile(times, 50)),
                             ms(percentile(times, 99)),
                             target(fig), check(fig)))
        print_table(rows, "lrrll")
        if big != TARGET_BLOCKS:
            print(f"(issue #5 states the snapshot, mount and memory targets for {TARGET_BLOCKS:,} blocks; "
                  f"checked here at {big:,})")
    if "reporting" in res:
        report_reporting(res["reporting"])
    missed = [c["what"] for c in all_checks(res) if not c["ok"]]
    print()
    print(f"targets: {len(all_checks(res)) - len(missed)} ok, {len(missed)} MISSED")


def all_checks(res: dict) -> list[dict]:
    checks = [c for row in res.get("fio", {}).get("rows", []) for c in row["checks"]]
    return checks + res.get("engine", {}).get("checks", []) + res.get("reporting", {}).get("checks", [])


def write_chart(res: dict, path: str) -> None:
    """Two panels: fusepool's ratios to qcow2 and to the plain file; p50/p99 latency of every target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fio = res["fio"]
    labels = {t["key"]: t["label"] for t in fio["targets"]}
    wlabels = {w["key"]: w["label"] for w in fio["workloads"]}
    units = {w["key"]: UNIT_FIGURE[w["unit"]] for w in fio["workloads"]}
    fp_rows = [r for r in fio["rows"] if r["ratio_plain"] or r["ratio_qcow2"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 6 + 0.32 * len(fp_rows)),
                                   gridspec_kw={"height_ratios": [max(len(fp_rows), 4) * 0.32 + 1, 4.5]})
    m = res["machine"]
    fig.suptitle(f"fusepool bench {m['commit']}: {m['nproc']} CPUs, kernel {m['kernel']}, "
                 f"{res['config']['size'] / MiB:,.0f} MiB files, {res['config']['runtime']:g} s runs, "
                 f"median of {res['config']['repeats']}", fontsize=11)
    ys = list(range(len(fp_rows)))
    height = 0.38
    for offset, side, color in ((-height / 2, "qcow2", "tab:blue"), (height / 2, "plain", "tab:gray")):
        drawn = [(y + offset, (r[f"ratio_{side}"] or {}).get(units[r["workload"]]))
                 for y, r in zip(ys, fp_rows, strict=False)]
        drawn = [(y, v) for y, v in drawn if v]  # no bar where the peer was skipped
        bars = ax1.barh([y for y, _ in drawn], [v for _, v in drawn], height, color=color,
                        label=f"fusepool / {side}")
        for bar, (_, value) in zip(bars, drawn, strict=False):
            ax1.text(bar.get_width() * 1.03, bar.get_y() + bar.get_height() / 2, f"{value:.2f}",
                         va="center", fontsize=7)
    ax1.axvline(QCOW2_MIN_RATIO, color="tab:blue", linestyle="--", linewidth=1,
                label=f"target vs qcow2: {QCOW2_MIN_RATIO:g}x")
    ax1.axvline(PLAIN_MIN_RATIO, color="tab:gray", linestyle=":", linewidth=1,
                label=f"target vs plain (seq): {PLAIN_MIN_RATIO:g}x")
    ax1.set_xscale("log")
    ax1.set_yticks(ys, [f"{wlabels[r['workload']]} | {labels[r['target']]}" for r in fp_rows], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("ratio of throughput (MB/s for seq, IOPS otherwise), log scale; higher is better")
    ax1.legend(fontsize=8, loc="lower right")
    ax1.grid(axis="x", which="both", alpha=0.3)

    targets = [t["key"] for t in fio["targets"]]
    workloads = [w["key"] for w in fio["workloads"]]
    rows = {(r["workload"], r["target"]): r for r in fio["rows"]}
    width = 0.8 / len(targets)
    colors = plt.get_cmap("tab10")
    for i, target in enumerate(targets):
        xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(workloads))]
        here = [(x, rows[w, target]["median"]) for x, w in zip(xs, workloads, strict=False)
                if (w, target) in rows]
        here = [(x, med) for x, med in here if med["p99_us"] > 0 and med["p50_us"] > 0]
        ax2.bar([x for x, _ in here], [med["p99_us"] for _, med in here], width, color=colors(i),
                label=labels[target])
        ax2.scatter([x for x, _ in here], [med["p50_us"] for _, med in here], color="black", marker="_",
                    s=40, zorder=3, label="p50" if i == 0 else None)
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(workloads)), [textwrap.fill(wlabels[w], 18) for w in workloads], fontsize=8)
    ax2.set_ylabel("completion latency, us\n(bar: p99, tick: p50), log scale")
    ax2.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax2.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
