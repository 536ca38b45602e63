#!/bin/sh
# Undo bench-fs.sh: unmount BENCH_DIR, drop its fstab line and wipe the
# filesystem signature, so bench-fs.sh starts from an empty disk again.
# Run loop-lvm-teardown.sh first (its files live there).
#
#   BENCH_DIR    the mount point (default: /srv/fusepool-bench)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

dir=${BENCH_DIR:-/srv/fusepool-bench}
label=fusepool-bench
need_root
need findmnt wipefs blkid

if disk=$(findmnt -n -o SOURCE --mountpoint "$dir"); then
    run umount "$dir"
    run wipefs -q -a "$disk"
elif disk=$(blkid -L "$label"); then
    run wipefs -q -a "$disk"
else
    log "no $label filesystem"
fi
if grep -qs "^LABEL=$label " /etc/fstab; then
    sed -i "\\|^LABEL=$label |d" /etc/fstab
fi
rmdir "$dir" 2>/dev/null || true
log "removed"
