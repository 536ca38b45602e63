#!/bin/sh
# Undo loop-lvm.sh: the thin volume, the pool, the loop devices, the files.
#
#   LOOP_LVM_DIR, LOOP_LVM_POOL, LOOP_LVM_VOLUME, BENCH_DIR: as for loop-lvm.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

dir=${LOOP_LVM_DIR:-${BENCH_DIR:-/srv/fusepool-bench}/loop-lvm}
pool=${LOOP_LVM_POOL:-loop-lvm-pool}
volume=${LOOP_LVM_VOLUME:-loop-lvm-bench}
need_root
need dmsetup losetup

for name in "$volume" "$pool"; do
    if dmsetup info "$name" >/dev/null 2>&1; then
        run dmsetup remove "$name"
    fi
done
for file in "$dir/data" "$dir/metadata"; do
    if [ -e "$file" ]; then
        for dev in $(losetup -n -O NAME -j "$file"); do
            run losetup -d "$dev"
        done
        rm -f "$file"
    fi
done
rmdir "$dir" 2>/dev/null || true
log "removed"
