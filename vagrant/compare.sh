#!/bin/sh
# Run tools/compare-modes on fusepool's loop and direct modes and on the two
# kernel thin volumes made by direct-lvm.sh and loop-lvm.sh.  Arguments are
# passed on to compare-modes.  Its temporary files (fusepool's pools) go to
# BENCH_DIR, the disk of loop-lvm's files, and it runs there.
#
#   FUSEPOOL_DIR, BENCH_DIR, DIRECT_LVM_VG, DIRECT_LVM_VOLUME, LOOP_LVM_VOLUME:
#   as for install-fusepool.sh, bench-fs.sh, direct-lvm.sh and loop-lvm.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

project=${FUSEPOOL_DIR:-$(dirname "$here")}
dir=${BENCH_DIR:-/srv/fusepool-bench}
direct=/dev/${DIRECT_LVM_VG:-docker}/${DIRECT_LVM_VOLUME:-bench}
loop=/dev/mapper/${LOOP_LVM_VOLUME:-loop-lvm-bench}
need_root
[ -x "$project/.venv/bin/python" ] || die "no $project/.venv: run install-fusepool.sh first"
[ -b "$direct" ] || die "no $direct: run direct-lvm.sh first"
[ -b "$loop" ] || die "no $loop: run loop-lvm.sh first"
[ -d "$dir" ] || die "no $dir: run bench-fs.sh first"

mkdir -p "$dir/tmp"
cd "$dir"
export TMPDIR="$dir/tmp"
run "$project/.venv/bin/python" "$project/tools/compare-modes" \
    --kernel-device "direct-lvm=$direct" --kernel-device "loop-lvm=$loop" "$@"
