#!/bin/sh
# Undo direct-lvm.sh: the thin volume, the pool, the volume group, the LVM
# labels of its disks (every PV of the VG, also one added by vgextend) and the
# profile.  Leaves the disks empty, so direct-lvm.sh can run again.
#
#   DIRECT_LVM_VG     volume group (default: docker)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

vg=${DIRECT_LVM_VG:-docker}
need_root
need vgs

if ! vgs "$vg" >/dev/null 2>&1; then
    log "no volume group $vg: nothing to remove"
else
    pvs=$(pvs --noheadings -o pv_name -S "vg_name=$vg")
    run vgchange -an "$vg"
    run vgremove -y "$vg"  # with its thin volumes and pool
    for pv in $pvs; do
        run pvremove -y "$pv"
    done
fi
rm -f /etc/lvm/profile/docker-thinpool.profile
log "removed"
