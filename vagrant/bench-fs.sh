#!/bin/sh
# An ext4 filesystem on the second disk, mounted on BENCH_DIR: it holds
# loop-lvm's sparse files and fusepool's pools, so both file-backed pools sit
# on a disk of their own, as direct-lvm does.  Safe to run again.
#
#   BENCH_DISK   the empty disk to use (default: /dev/vdc, else /dev/sdc)
#   BENCH_DIR    where to mount it (default: /srv/fusepool-bench)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

disk=${BENCH_DISK:-$(first_disk /dev/vdc /dev/sdc || echo /dev/vdc)}
dir=${BENCH_DIR:-/srv/fusepool-bench}
label=fusepool-bench
need_root
need blkid mkfs.ext4 mountpoint

if mountpoint -q "$dir"; then
    log "$dir is mounted: keeping it"
else
    if [ "$(blkid -p -s LABEL -o value "$disk" 2>/dev/null || true)" = "$label" ]; then
        log "$disk already holds the $label filesystem: mounting it"
    else
        check_empty_disk "$disk"
        run mkfs.ext4 -q -L "$label" "$disk"
    fi
    mkdir -p "$dir"
    run mount "$disk" "$dir"
fi
if ! grep -qs "^LABEL=$label " /etc/fstab; then  # mounted again after a reboot
    echo "LABEL=$label $dir ext4 defaults,nofail 0 2" >>/etc/fstab
fi
log "ready: $dir on $disk"
