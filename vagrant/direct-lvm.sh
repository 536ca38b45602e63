#!/bin/sh
# A direct-lvm thin pool built the way Docker's devicemapper documentation
# ("Configure direct-lvm mode manually") builds it, then one thin volume on it
# for tools/compare-modes.  Safe to run again: what exists is kept.
#
#   DIRECT_LVM_DISK   the empty disk to use (default: /dev/vdb, else /dev/sdb)
#   DIRECT_LVM_VG     volume group (default: docker, as in Docker's docs)
#   DIRECT_LVM_VOLUME thin volume name (default: bench) -> /dev/$VG/$VOLUME
#   THIN_VOLUME_SIZE  its virtual size (default: 10G, Docker's dm.basesize)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

disk=${DIRECT_LVM_DISK:-$(first_disk /dev/vdb /dev/sdb || echo /dev/vdb)}
vg=${DIRECT_LVM_VG:-docker}
volume=${DIRECT_LVM_VOLUME:-bench}
size=${THIN_VOLUME_SIZE:-10G}
bytes "$size" >/dev/null
need_root
need pvcreate lvs blkid numfmt

if vgs "$vg" >/dev/null 2>&1; then
    log "volume group $vg exists: keeping it"
else
    check_empty_disk "$disk"
    run pvcreate "$disk"
    run vgcreate "$vg" "$disk"
fi
if lvs "$vg/thinpool" >/dev/null 2>&1; then
    log "thin pool $vg/thinpool exists: keeping it"
else
    # 95% data, 1% metadata: the rest of the VG is left for the metadata spare
    # LVM keeps and for autoextend (which needs free extents: see README.md).
    run lvcreate --wipesignatures y -n thinpool "$vg" -l 95%VG
    run lvcreate --wipesignatures y -n thinpoolmeta "$vg" -l 1%VG
    # 512 KiB chunks, no zeroing of newly provisioned chunks
    run lvconvert -y --zero n -c 512K --thinpool "$vg/thinpool" --poolmetadata "$vg/thinpoolmeta"
fi

# The autoextend profile: when the pool is 80% full, dmeventd grows it by 20%.
mkdir -p /etc/lvm/profile
cat >/etc/lvm/profile/docker-thinpool.profile <<'EOF'
activation {
    thin_pool_autoextend_threshold=80
    thin_pool_autoextend_percent=20
}
EOF
run lvchange --metadataprofile docker-thinpool "$vg/thinpool"
run lvs -o+seg_monitor "$vg"

if lvs "$vg/$volume" >/dev/null 2>&1; then
    log "thin volume $vg/$volume exists: keeping it"
    run vgchange -ay "$vg"  # active, as after a boot
else
    run lvcreate -V "$size" -T "$vg/thinpool" -n "$volume"
fi
[ -b "/dev/$vg/$volume" ] || die "/dev/$vg/$volume did not appear"
log "ready: /dev/$vg/$volume on $disk"
