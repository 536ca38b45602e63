#!/bin/sh
# A loop-lvm thin pool the way Docker's devicemapper driver built one when it
# was given no block device: sparse data and metadata files on loop devices,
# a kernel thin-pool made with dmsetup, one thin device in it.  Run again (or
# after a reboot) it re-attaches the existing files, as Docker did at start.
#
#   LOOP_LVM_DIR            where the files live (default: $BENCH_DIR/loop-lvm,
#                           BENCH_DIR defaulting to /srv/fusepool-bench)
#   LOOP_LVM_DATA_SIZE      sparse data file (default: 100G, Docker's default)
#   LOOP_LVM_METADATA_SIZE  sparse metadata file (default: 2G, Docker's default)
#   LOOP_LVM_BLOCK_SECTORS  pool block size in 512-byte sectors (default: 1024 =
#                           512 KiB, the chunk size of direct-lvm.sh; Docker's
#                           loop-lvm used 128 = 64 KiB)
#   LOOP_LVM_LOW_WATER_MARK free blocks below which the kernel raises an event
#                           (default: 32768, Docker's)
#   LOOP_LVM_POOL           dm name of the pool (default: loop-lvm-pool)
#   LOOP_LVM_VOLUME         dm name of the thin volume (default: loop-lvm-bench)
#                           -> /dev/mapper/$LOOP_LVM_VOLUME, thin device id 0
#   THIN_VOLUME_SIZE        its virtual size (default: 10G)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

dir=${LOOP_LVM_DIR:-${BENCH_DIR:-/srv/fusepool-bench}/loop-lvm}
data_size=${LOOP_LVM_DATA_SIZE:-100G}
metadata_size=${LOOP_LVM_METADATA_SIZE:-2G}
block_sectors=${LOOP_LVM_BLOCK_SECTORS:-1024}
low_water=${LOOP_LVM_LOW_WATER_MARK:-32768}
pool=${LOOP_LVM_POOL:-loop-lvm-pool}
volume=${LOOP_LVM_VOLUME:-loop-lvm-bench}
size=${THIN_VOLUME_SIZE:-10G}
size_bytes=$(bytes "$size")
volume_sectors=$((size_bytes / 512))
bytes "$data_size" >/dev/null
bytes "$metadata_size" >/dev/null
need_root
need dmsetup losetup truncate blockdev numfmt

# The loop device of a file: the one it is attached to already, or a new one.
loop_of() {
    dev=$(losetup -n -O NAME -j "$1" | head -n 1)
    if [ -z "$dev" ]; then
        dev=$(losetup -f --show "$1")
    fi
    echo "$dev"
}

if dmsetup info "$pool" >/dev/null 2>&1; then
    log "pool $pool exists: keeping it"
else
    mkdir -p "$dir"
    if [ -e "$dir/data" ] && [ -e "$dir/metadata" ]; then
        new=no
        log "re-attaching $dir/data and $dir/metadata"
    elif [ -e "$dir/data" ] || [ -e "$dir/metadata" ]; then
        die "only one of $dir/data and $dir/metadata exists: run loop-lvm-teardown.sh first"
    else
        new=yes
        run truncate -s "$data_size" "$dir/data"
        run truncate -s "$metadata_size" "$dir/metadata"
    fi
    data=$(loop_of "$dir/data")
    metadata=$(loop_of "$dir/metadata")
    log "data on $data, metadata on $metadata"
    if [ "$new" = yes ]; then
        # a zeroed superblock: the kernel formats fresh metadata
        run dd if=/dev/zero of="$metadata" bs=4096 count=1 conv=fsync status=none
    fi
    sectors=$(blockdev --getsz "$data")
    sectors=$((sectors / block_sectors * block_sectors))  # whole blocks only
    # No zeroing of new blocks, as Docker's loop-lvm (and direct-lvm.sh's --zero n).
    run dmsetup create "$pool" --table \
        "0 $sectors thin-pool $metadata $data $block_sectors $low_water 1 skip_block_zeroing"
    if [ "$new" = yes ]; then
        run dmsetup message "$pool" 0 "create_thin 0"
    fi
fi

if dmsetup info "$volume" >/dev/null 2>&1; then
    log "thin volume $volume exists: keeping it"
else
    run dmsetup create "$volume" --table "0 $volume_sectors thin /dev/mapper/$pool 0"
fi
[ -b "/dev/mapper/$volume" ] || die "/dev/mapper/$volume did not appear"
run dmsetup table "$pool"
log "ready: /dev/mapper/$volume in $dir"
