"""tools/compare-modes' report: Markdown, charts and advice from a run's figures."""

import os
import statistics

from .env import MiB
from .modes_run import PROBE_FACTOR
from .report import SAME, mib, ratio_text, size_text
from .report import num as _num
from .workloads import UNIT_FIGURE


def num(value: float) -> str:
    return _num(value, 1)


class Report:
    """Markdown, charts and advice from a run's figures (``res``, as in the JSON)."""

    def __init__(self, res: dict):
        self.res = res
        self.labels = {t["key"]: t["label"] for t in res["targets"]}
        self.kinds = {t["key"]: t["kind"] for t in res["targets"]}
        self.rows = {(r["step"], r["target"]): r["median"] for r in res["fio"]["rows"]}
        self.steps = {s["key"]: s for s in res["fio"]["steps"]}
        self.advice: dict[str, list[str]] = {}

    def fig(self, step: str, target: str, figure: str | None = None) -> float | None:
        med = self.rows.get((step, target))
        if med is None:
            return None
        return med[figure or UNIT_FIGURE[self.steps[step]["unit"]]]

    # -- advice: one sentence per difference, from the figures --------------------------------

    def fio_advice(self) -> list[str]:
        out = []
        for step, what, writes in (("seq_over", "Sequential 1 MiB writes", True),
                                   ("rand_over", "Random 4 KiB writes", True),
                                   ("seq_read", "Cold sequential 1 MiB reads", False),
                                   ("rand_read", "Cold random 4 KiB reads", False)):
            lo, di = self.fig(step, "loop"), self.fig(step, "direct")
            if lo is None or di is None:
                continue
            unit = self.steps[step]["unit"]
            figures = f"{num(lo)} {unit} in loop mode, {num(di)} {unit} in direct mode"
            if abs(lo / di - 1) <= SAME:
                out.append(f"{what} ran at about the same speed ({figures}): for this kind of I/O choose "
                           "the mode for the reasons in the other sections.")
            elif lo > di:
                why = ("the host page cache absorbs buffered writes until the fsync, while direct mode waits "
                       "for the device on every write" if writes else
                       "loop mode's reads come through the host page cache and its read-ahead")
                out.append(f"{what} were {lo / di:.1f}x faster in loop mode ({figures}; {why}): use loop "
                           f"mode when this kind of I/O dominates and the host has memory to spare.")
            else:
                out.append(f"{what} were {di / lo:.1f}x faster in direct mode ({figures}): use direct mode "
                           "when this kind of I/O dominates.")
        lp, dp = self.fig("rand_over", "loop", "p99_us"), self.fig("rand_over", "direct", "p99_us")
        if lp and dp and abs(lp / dp - 1) > SAME:
            better = "loop" if lp < dp else "direct"
            out.append(f"The p99 latency of random 4 KiB overwrites was {num(lp)} us in loop mode and "
                       f"{num(dp)} us in direct mode: for a latency-sensitive writer (a database) prefer "
                       f"{better} mode.")
        for t, kind in self.kinds.items():
            if kind != "kernel":
                continue
            for step in ("seq_over", "rand_over"):
                k, di = self.fig(step, t), self.fig(step, "direct")
                if k and di:
                    unit = self.steps[step]["unit"]
                    out.append(f"The kernel's {self.labels[t]} volume ran {self.steps[step]['label']} at "
                               f"{num(k)} {unit}, {ratio_text(k, di)} fusepool's direct mode ({num(di)} "
                               f"{unit}): use the kernel's thin pools where root and dm-thin are available "
                               "and this throughput matters; fusepool where they are not.")
        return out

    def first_write_advice(self) -> list[str]:
        out = []
        for region, what in (("seq", "sequential 1 MiB"), ("rand", "random 4 KiB")):
            parts = []
            for t in self.kinds:
                first, over = self.fig(f"{region}_first", t), self.fig(f"{region}_over", t)
                if first and over:
                    parts.append((t, first / over))
            if len(parts) < 2:
                continue
            text = ", ".join(f"{self.labels[t]} {r:.2f}" for t, r in parts)
            worst = min(parts, key=lambda p: p[1])
            if all(r >= 1 - SAME for _, r in parts):
                out.append(f"First {what} writes to never-written blocks ran as fast as overwrites "
                           f"(first/overwrite: {text}): provisioning costs nothing noticeable here, so "
                           "there is no need to write volumes in advance.")
            else:
                out.append(f"First {what} writes ran at {worst[1]:.0%} of an overwrite's speed on "
                           f"{self.labels[worst[0]]} (first/overwrite: {text}): a first write provisions a "
                           "block (and zero-fills the rest of it when the write is partial), so expect "
                           "newly used space to be slower, and measure a workload after its volume was "
                           "written once.")
        return out

    def page_cache_advice(self) -> list[str]:
        pc = self.res["page_cache"]
        if "loop" not in pc or "direct" not in pc:
            return []
        lo, di = pc["loop"], pc["direct"]
        out = [f"After reading a {size_text(lo['read_bytes'])} volume, loop mode held "
               f"{mib(lo['volume_bytes'])} for the volume plus {mib(lo['lower_bytes'])} for its data file "
               f"in the host page cache (the same data twice), direct mode {mib(di['volume_bytes'])} plus "
               f"{mib(di['lower_bytes'])}: use direct mode when many volumes are read on a host short of "
               "memory; in loop mode the second copy is reclaimable cache that only costs memory other "
               "programs could use."]
        for t, kind in self.kinds.items():
            if kind == "kernel":
                k = pc[t]
                if k["lower"]:
                    out.append(f"The kernel's {self.labels[t]} volume sits on loop devices over files: "
                               f"{mib(k['volume_bytes'])} cached for the device plus {mib(k['lower_bytes'])} "
                               "for the files under it, the same double caching as fusepool's loop mode "
                               "(losetup --direct-io=on avoids it); the device's own copy lasts while it is "
                               "open (a mounted filesystem keeps it), the files' copy stays after that.")
                else:
                    out.append(f"The kernel's {self.labels[t]} volume cached {mib(k['volume_bytes'])} for "
                               "the device and nothing below it (no files underneath), like fusepool's "
                               "direct mode.")
        return out

    def fragmentation_advice(self) -> list[str]:
        fr = self.res["fragmentation"]
        lo, di = fr.get("loop", {}), fr.get("direct", {})
        lo_first, lo_end = sum(lo.get("after_random_writes", {}).values()), sum(lo.get("at_end", {}).values())
        if not lo.get("at_end"):
            return []
        if di.get("at_end"):
            di_text = (f"direct mode's preallocated file {sum(di['after_random_writes'].values())} "
                       f"and {sum(di['at_end'].values())}")
        else:
            di_text = "direct mode's data is a block device (no host filesystem to fragment)"
        churn = " (after volumes were removed and written again)" if self.res["config"]["repeats"] > 1 else ""
        sentence = (f"Loop mode's data file had {lo_first} extents after the random-write run and "
                    f"{lo_end} at the end{churn}, {di_text}: ")
        di_end = sum(di.get("at_end", {}).values()) or 1
        if lo_end > 4 * di_end and lo_end > 16:
            sentence += ("on a loop pool with heavy random writes and churn, sequential reads turn into "
                         "seeks on the host disk; use direct mode there, or defragment the idle data file "
                         "(e4defrag on ext4, xfs_fsr on XFS).")
        else:
            sentence += ("the data file stayed in few extents, so fragmentation is no reason to pick "
                         "direct mode on this host filesystem.")
        return [sentence]

    def space_advice(self) -> list[str]:
        sp = self.res["space"]
        probe = sp["probe"]
        out = []
        lo, di = probe["loop"], probe["direct"]
        host = size_text(probe["host_free"])
        asked = size_text(probe["data_size"])
        if lo["made"] and not di["made"]:
            out.append(f"Loop mode accepted a pool of {asked} on a filesystem with {host} free, holding "
                       f"{mib(lo.get('host_allocated', 0))} of it; --preallocate refused it ("
                       f"\"{di['message']}\"): use direct mode when the pool must never run "
                       "out of host space behind its back; in loop mode watch Data Space Available in "
                       "`fusepool info` (capped by the host's free space) or set --autoextend-threshold "
                       "with --max-data-size.")
        else:
            out.append(f"A pool of {asked} on a filesystem with {host} free: loop mode "
                       f"{'made it' if lo['made'] else 'refused it'}, direct mode "
                       f"{'made it' if di['made'] else 'refused it'}.")
        for key in ("loop", "direct"):
            if key in sp:
                s = sp[key]
                promised = s["volume_sizes"] / s["data_size"]
                out.append(f"The {key} pool's volumes promise {size_text(s['volume_sizes'])} on "
                           f"{size_text(s['data_size'])} of pool data ({promised:.1f}x) "
                           f"while the host gave it {mib(s['host_allocated'])}: volumes overcommit the pool "
                           "in both modes (that is thin provisioning), so keep --min-free-space and a "
                           "--low-water-mark hook whichever mode you use.")
                break
        return out

    def snapshot_advice(self) -> list[str]:
        sn = self.res.get("snapshots", {})
        if "loop" not in sn or "direct" not in sn:
            return []
        lo, di = sn["loop"], sn["direct"]
        n = lo["count"]
        lc, dc = sum(lo["create_s"]), sum(di["create_s"])
        lr, dr = sum(lo["remove_s"]), sum(di["remove_s"])
        lm, dm = (statistics.median(x["create_s"]) * 1e3 for x in (lo, di))
        figures = (f"{n} snapshots took {lc:.1f} s to create and {lr:.1f} s to remove in loop mode, "
                   f"{dc:.1f} s and {dr:.1f} s in direct mode (median {lm:.0f} / {dm:.0f} ms per "
                   "`fusepool snapshot`)")
        if abs((lc + lr) / (dc + dr) - 1) <= 0.25:
            return [f"{figures}: snapshots are metadata only, so their cost does not depend on the mode; "
                    "choose the mode for I/O and space."]
        faster = "loop" if lc + lr < dc + dr else "direct"
        return [f"{figures}: for snapshot-heavy use (many short-lived containers) {faster} mode is faster."]

    # -- charts ---------------------------------------------------------------------------------

    def charts(self, out_dir: str) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        made = []
        targets = list(self.labels)
        colors = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(targets)}
        title = self.title()

        def save(fig, name: str) -> None:
            fig.suptitle(title, fontsize=9)
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, name), dpi=100)
            plt.close(fig)
            made.append(name)

        def grouped(ax, groups: list[str], value, ylabel: str, log: bool = False) -> None:
            width = 0.8 / len(targets)
            for i, t in enumerate(targets):
                xs, ys = [], []
                for j, g in enumerate(groups):
                    v = value(g, t)
                    if v:
                        xs.append(j + (i - (len(targets) - 1) / 2) * width)
                        ys.append(v)
                bars = ax.bar(xs, ys, width, color=colors[t], label=self.labels[t])
                for bar, v in zip(bars, ys, strict=True):
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), num(v), ha="center",
                            va="bottom", fontsize=7)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([self.steps[g]["label"].replace(", ", "\n") if g in self.steps else g
                                for g in groups], fontsize=8)
            ax.set_ylabel(ylabel)
            if log:
                ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)

        seq = [s for s in self.steps if s.startswith("seq")]
        rand = [s for s in self.steps if s.startswith("rand")]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
        grouped(axes[0], seq, lambda g, t: self.fig(g, t, "mb_s"), "MB/s (higher is better)")
        grouped(axes[1], rand, lambda g, t: self.fig(g, t, "iops"), "IOPS (higher is better)")
        grouped(axes[2], seq + rand, lambda g, t: self.fig(g, t, "p99_us"), "p99 latency, us (log; lower "
                "is better)", log=True)
        axes[2].set_xticklabels([self.steps[g]["label"] for g in seq + rand], fontsize=7, rotation=25,
                                ha="right")
        save(fig, "throughput-latency.png")

        fig, ax = plt.subplots(figsize=(8, 4.5))
        regions = ["seq", "rand"]
        width = 0.8 / len(targets)
        for i, t in enumerate(targets):
            xs, ys = [], []
            for j, r in enumerate(regions):
                first, over = self.fig(f"{r}_first", t), self.fig(f"{r}_over", t)
                if first and over:
                    xs.append(j + (i - (len(targets) - 1) / 2) * width)
                    ys.append(first / over)
            bars = ax.bar(xs, ys, width, color=colors[t], label=self.labels[t])
            for bar, v in zip(bars, ys, strict=True):
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.2f}", ha="center",
                        va="bottom", fontsize=8)
        ax.axhline(1, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(regions)))
        ax.set_xticklabels(["seq 1 MiB write", "rand 4 KiB write"])
        ax.set_ylabel("first write / overwrite throughput\n(1 = provisioning costs nothing)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "first-write.png")

        pc = self.res["page_cache"]
        fig, ax = plt.subplots(figsize=(8, 1.6 + 0.6 * len(targets)))
        ys = range(len(targets))
        upper = [pc[t]["volume_bytes"] / MiB for t in targets]
        lower = [pc[t]["lower_bytes"] / MiB for t in targets]
        ax.barh(ys, upper, color="tab:blue", label="the volume / device itself")
        ax.barh(ys, lower, left=upper, color="tab:red",
                label="files under it (data file, loop backing files)")
        for y, u, lw in zip(ys, upper, lower, strict=True):
            ax.text(u + lw, y, f" {u + lw:,.1f} MiB", va="center", fontsize=8)
        read = max(pc[t]["read_bytes"] for t in targets) / MiB
        ax.axvline(read, color="gray", linestyle="--", linewidth=1, label=f"bytes read: {read:,.0f} MiB")
        ax.set_yticks(list(ys))
        ax.set_yticklabels([self.labels[t] for t in targets])
        ax.invert_yaxis()
        ax.set_xlabel("host page cache after one read of the volume, MiB")
        ax.legend(fontsize=8, loc="lower right")
        save(fig, "page-cache.png")

        fr = self.res["fragmentation"]
        with_files = [t for t in targets if fr[t].get("at_end")]
        fig, ax = plt.subplots(figsize=(8, 4))
        if with_files:
            width = 0.38
            series = (("after_random_writes", "tab:orange"), ("at_end", "tab:purple"))
            for k, (when, color) in enumerate(series):
                xs = [i + (k - 0.5) * width for i in range(len(with_files))]
                vals = [sum(fr[t][when].values()) for t in with_files]
                bars = ax.bar(xs, vals, width, color=color,
                              label="after the random-write run" if k == 0 else "at the end")
                for bar, v in zip(bars, vals, strict=True):
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), str(v), ha="center",
                            va="bottom", fontsize=8)
            ax.set_xticks(range(len(with_files)))
            ax.set_xticklabels([self.labels[t] for t in with_files])
            ax.legend(fontsize=8)
        ax.set_ylabel("extents of the data file(s) (filefrag)")
        ax.grid(axis="y", alpha=0.3)
        save(fig, "fragmentation.png")

        sp = self.res["space"]
        probe = sp["probe"]
        pools = [t for t in targets if t in sp and "data_size" in sp[t]]
        groups = [(f"{self.labels[t]} pool", sp[t]) for t in pools]
        if probe["loop"]["made"]:
            groups.append((f"loop pool of {PROBE_FACTOR}x\nthe host's free space",
                           {"data_size": probe["data_size"], "host_free": probe["host_free"],
                            "host_allocated": probe["loop"]["host_allocated"]}))
        fig, ax = plt.subplots(figsize=(10, 4.5))
        series = [("volume_sizes", "promised to volumes (virtual sizes)", "tab:gray"),
                  ("data_size", "pool data size", "tab:blue"),
                  ("host_allocated", "host space allocated to the data", "tab:green"),
                  ("host_free", "host filesystem free space", "tab:olive")]
        width = 0.8 / len(series)
        for k, (field, label, color) in enumerate(series):
            drawn = [(i + (k - (len(series) - 1) / 2) * width, g[field] / MiB)
                     for i, (_, g) in enumerate(groups) if field in g]
            bars = ax.bar([x for x, _ in drawn], [max(v, 0.01) for _, v in drawn], width, color=color,
                          label=label)
            for bar, (_, v) in zip(bars, drawn, strict=True):
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:,.0f}", ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([name for name, _ in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("MiB (log)")
        ax.set_title(f"a pool of {size_text(probe['data_size'])} with {size_text(probe['host_free'])} free: "
                     "loop "
                     f"{'made' if probe['loop']['made'] else 'refused'}, direct "
                     f"{'made' if probe['direct']['made'] else 'refused'}", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "space.png")

        sn = self.res["snapshots"]
        fig, ax = plt.subplots(figsize=(8, 4))
        keys = list(sn)
        width = 0.38
        for k, (phase, label, color) in enumerate((("create_s", "fusepool snapshot", "tab:blue"),
                                                   ("remove_s", "fusepool remove", "tab:red"))):
            xs = [i + (k - 0.5) * width for i in range(len(keys))]
            vals = [statistics.median(sn[t][phase]) * 1e3 for t in keys]
            p90 = [sorted(sn[t][phase])[int(0.9 * (len(sn[t][phase]) - 1))] * 1e3 for t in keys]
            bars = ax.bar(xs, vals, width, color=color, label=f"{label}: median")
            ax.scatter(xs, p90, color="black", marker="_", s=60, zorder=3, label="p90" if k == 0 else None)
            for bar, v in zip(bars, vals, strict=True):
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:,.0f}", ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{self.labels[t]} pool" for t in keys])
        ax.set_ylabel("ms per command (process start included)")
        ax.set_title(f"{sn[keys[0]]['count']} snapshots of a written volume, then {sn[keys[0]]['count']} "
                     "removes", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "snapshots.png")
        return made

    # -- Markdown -----------------------------------------------------------------------------

    def title(self) -> str:
        m, c = self.res["machine"], self.res["config"]
        return (f"fusepool compare-modes {m['commit']}: {m['nproc']} CPUs, kernel {m['kernel']}, "
                f"{c['size'] / MiB:,.0f} MiB volumes, {c['runtime']:g} s runs, median of {c['repeats']}")

    def markdown(self) -> str:
        res, m, c = self.res, self.res["machine"], self.res["config"]
        targets = list(self.labels)
        lines: list[str] = []
        add = lines.append

        def table(header: list[str], rows: list[list[str]], align: str) -> None:
            add("| " + " | ".join(header) + " |")
            add("|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|")
            for r in rows:
                add("| " + " | ".join(r) + " |")
            add("")

        def chart(name: str, alt: str) -> None:
            add(f"![{alt}]({name})")
            add("")

        def advice(sentences: list[str]) -> None:
            for s in sentences:
                add(f"- {s}")
            add("")

        add("# loop mode vs direct mode: measured")
        add("")
        add(f"Command: `{res['command']}`  ")
        add(f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, {m['os']}, kernel "
            f"{m['kernel']}; pools on {m['dir_filesystem']} (`{c['dir']}`)  ")
        versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        add(f"Versions: {versions}; commit {m['commit']}  ")
        add(f"Load average (1/5/15 min): {res['load_before']} before, {res['load_after']} after  ")
        add(f"Settings: {c['size'] / MiB:,.0f} MiB per volume, fio runs of {c['runtime']:g} s, median of "
            f"{c['repeats']} repeat(s), {c['snapshots']} snapshots, pools of {c['data_size'] / MiB:,.0f} MiB "
            f"data with 64 KiB blocks; page cache "
            + ("dropped before every run" if c["caches_dropped"]
               else "NOT dropped (not root): cold reads may come from memory"))
        add("")
        add("Targets:")
        add("")
        for t in res["targets"]:
            if t["kind"] == "loop":
                add(f"- **{t['label']}**: `fusepool init --mode loop` (sparse data file `{t['data']}`)")
            elif t["kind"] == "direct":
                how = "--data-device" if c["data_device"] else "--preallocate"
                add(f"- **{t['label']}**: `fusepool init {how}` (data `{t['data']}`, O_DIRECT)")
            else:
                below = ", ".join(f"{b['device']} over `{b['file']}`{' (direct I/O)' if b['dio'] else ''}"
                                  for b in t["backing"]) or "no loop devices"
                add(f"- **{t['label']}**: kernel block device `{t['path']}` ({below})")
        add("")

        add("## Throughput and p99 latency")
        add("")
        add("fio " + " ".join(res["fio"]["fio_common_args"][:-1]) + "; MB/s are 10^6 bytes/s, p99 is "
            "fio's completion latency.")
        add("")
        header = ["workload"] + [f"{self.labels[t]} MB/s" for t in targets] + \
            [f"{self.labels[t]} IOPS" for t in targets] + [f"{self.labels[t]} p99 us" for t in targets]
        rows = []
        for key, s in self.steps.items():
            row = [s["label"]]
            for figure in ("mb_s", "iops", "p99_us"):
                row += [num(v) if (v := self.fig(key, t, figure)) is not None else "not run" for t in targets]
            rows.append(row)
        table(header, rows, "l" + "r" * (len(header) - 1))
        chart("throughput-latency.png", "throughput and p99 latency per workload")
        advice(self.advice.setdefault("fio", self.fio_advice()))

        add("## First write vs overwrite")
        add("")
        add("A first write lands on blocks the pool (or the kernel's thin pool) has not provisioned yet; "
            "an overwrite on blocks the volume already owns.")
        add("")
        rows = []
        for r in ("seq", "rand"):
            for t in targets:
                first, over = self.fig(f"{r}_first", t), self.fig(f"{r}_over", t)
                if first and over:
                    unit = self.steps[f"{r}_first"]["unit"]
                    rows.append([self.steps[f"{r}_first"]["label"].split(",")[0], self.labels[t],
                                 f"{num(first)} {unit}", f"{num(over)} {unit}", f"{first / over:.2f}",
                                 f"{num(self.fig(f'{r}_first', t, 'p99_us'))} / "
                                 f"{num(self.fig(f'{r}_over', t, 'p99_us'))}"])
        table(["workload", "target", "first write", "overwrite", "first / overwrite", "p99 us first / over"],
              rows, "llrrrr")
        chart("first-write.png", "first write vs overwrite")
        advice(self.advice.setdefault("first_write", self.first_write_advice()))

        add("## Host page cache (double caching)")
        add("")
        add("The page cache was emptied of the volume and the files under it, then the volume was read "
            "once in 1 MiB reads; the figures are the bytes resident afterwards (mincore). "
            "*meminfo* is the change of Cached in /proc/meminfo over the read: the whole machine, so "
            "other processes move it.")
        add("")
        rows = []
        pc = res["page_cache"]
        for t in targets:
            p = pc[t]
            rows.append([self.labels[t], mib(p["read_bytes"]), mib(p["volume_bytes"]), mib(p["lower_bytes"]),
                         mib(p["volume_bytes"] + p["lower_bytes"]), mib(p["meminfo_cached_delta"])])
        table(["target", "read", "cached: volume", "cached: files under it", "total", "meminfo Cached +"],
              rows, "lrrrrr")
        chart("page-cache.png", "host page cache after one read")
        advice(self.advice.setdefault("page_cache", self.page_cache_advice()))

        add("## Host filesystem fragmentation")
        add("")
        add("Extents of the data file as `filefrag` counts them, right after the first random 4 KiB "
            "write run and at the end of the run"
            + (" (each repeat removes the previous repeat's volumes first)" if c["repeats"] > 1 else "")
            + ".")
        add("")
        rows = []
        fr = res["fragmentation"]
        for t in targets:
            files = fr[t].get("at_end", {})
            if files:
                rows.append([self.labels[t], ", ".join(f"`{f}`" for f in files),
                             str(sum(fr[t]["after_random_writes"].values())), str(sum(files.values()))])
            else:
                rows.append([self.labels[t], "none: a block device", "-", "-"])
        table(["target", "file(s)", "extents after random writes", "extents at the end"], rows, "llrr")
        chart("fragmentation.png", "data file extents")
        advice(self.advice.setdefault("fragmentation", self.fragmentation_advice()))

        add("## Space: promised vs really available (overcommit)")
        add("")
        sp = res["space"]
        rows = []
        for t in targets:
            s = sp.get(t)
            if s and "data_size" in s:
                rows.append([f"{self.labels[t]} pool", str(s["volumes"]), size_text(s["volume_sizes"]),
                             size_text(s["data_size"]), mib(s["data_used"]), mib(s["host_allocated"]),
                             mib(s["data_available"]), size_text(s["host_free"])])
            elif s:
                for b in s["backing"]:
                    rows.append([f"{self.labels[t]}: `{b['file']}` under {b['device']}", "-",
                                 size_text(s["device_size"]) + " (device)", size_text(b["size"]) + " (file)",
                                 "-", mib(b["allocated"]), "-", size_text(b["host_free"])])
                if not s["backing"]:
                    rows.append([self.labels[t], "-", "-", size_text(s["device_size"]) + " (device)", "-",
                                 "a block device", "-", "-"])
        table(["target", "volumes", "virtual sizes", "pool data size", "data used", "host allocated",
               "Data Space Available", "host free"], rows, "lrrrrrrr")
        probe = sp["probe"]
        add(f"A pool of {size_text(probe['data_size'])} ({PROBE_FACTOR}x the {size_text(probe['host_free'])} "
            "free on the host):")
        add("")
        for mode, how in (("loop", "`fusepool init --mode loop`"),
                          ("direct", "`fusepool init --preallocate`")):
            e = probe[mode]
            detail = (f"made, {mib(e.get('host_allocated', 0))} allocated on the host (then removed)"
                      if e["made"] else f"refused: \"{e['message']}\"")
            add(f"- {how}: {detail}")
        add("")
        add("Each pool also holds a volume `promise` of twice the pool's data size, so the virtual sizes "
            "exceed the pool in both modes.")
        add("")
        chart("space.png", "space promised vs available")
        advice(self.advice.setdefault("space", self.space_advice()))

        add("## Snapshots")
        add("")
        sn = res["snapshots"]
        rows = []
        for t, s in sn.items():
            rows.append([f"{self.labels[t]} pool", str(s["count"]), f"{sum(s['create_s']):.2f} s",
                         f"{statistics.median(s['create_s']) * 1e3:,.0f} ms", f"{sum(s['remove_s']):.2f} s",
                         f"{statistics.median(s['remove_s']) * 1e3:,.0f} ms"])
        table(["pool", "snapshots", "create: total", "create: median", "remove: total", "remove: median"],
              rows, "lrrrrr")
        for t, kind in self.kinds.items():
            if kind == "kernel":
                add(f"Not measured on {self.labels[t]}: a kernel thin snapshot needs the pool's LVM or "
                    "dmsetup names, which a device path does not give.")
                add("")
        chart("snapshots.png", "snapshot create and remove times")
        advice(self.advice.setdefault("snapshots", self.snapshot_advice()))

        add("## What limits these figures")
        add("")
        add(f"- One machine, one run: {m['nproc']} CPUs shared with whatever else ran (load average above); "
            "compare the targets of one report with each other, not with other machines.")
        add(f"- fio runs of {c['runtime']:g} s on {c['size'] / MiB:,.0f} MiB; first writes stop at the "
            "runtime or after one pass. Short runs and small volumes favour caches.")
        add("- The page-cache figures count what one read left behind; under memory pressure the kernel "
            "reclaims the second copy first, so they show the cost, not a steady state.")
        add("- Fragmentation depends on the host filesystem and how full it is; a fresh, roomy filesystem "
            "shows the least.")
        add("- Snapshot times include starting the `fusepool` command (Python) each time.")
        if any(k == "kernel" for k in self.kinds.values()):
            add("- Kernel devices: first-write figures are first writes only on a never-written thin volume; "
                "under TCG emulation (tools/kernel-vm) only ratios inside one report mean anything.")
            add("- Kernel devices: the kernel drops a block device's page cache when its last user closes it "
                "(every fio run opens and closes the device), so their reads are cold even without root, "
                "while a filesystem mounted on the device would keep its cache.")
        add("")
        return "\n".join(lines)
