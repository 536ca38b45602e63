"""Code shared by the benchmark tools in tools/ (bench, compare-modes, bench-concurrency, bench-metadata).

Each tool is a short entry point (its options, presets and main); the method lives here:
env (the machine, fusepool's CLI, progress lines), host (page cache, extents), targets (what
fio runs on: mounts, qemu-storage-daemon exports, loop/direct pools, kernel devices),
workloads (fio jobs and their figures), pools (engine pools with mappings only), report
(tables, ratios, percentiles, verdicts), sections (tools/bench's parts), modes and
modes_report (tools/compare-modes' measurements and report).  Modules import fusepool only
inside functions, so a tool can re-execute itself under the venv before fusepool is needed.
"""
