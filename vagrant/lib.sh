# shellcheck shell=sh
# Helpers shared by the provisioning scripts in vagrant/ (sourced, never run).
# POSIX sh: the same scripts run under bash in the Vagrant box and under dash
# in the throw-away VM of tools/kernel-vm.

prog=$(basename "$0")

log() { printf '%s: %s\n' "$prog" "$*"; }

die() {
    printf '%s: %s\n' "$prog" "$*" >&2
    exit 1
}

# Print a command the way Docker's documentation shows it, then run it.
run() {
    printf '+ %s\n' "$*"
    "$@"
}

need_root() {
    [ "$(id -u)" = 0 ] || die "run me as root (sudo $0)"
}

need() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found: apt-get install lvm2 dmsetup util-linux mount e2fsprogs"
    done
}

# The first of the given paths that is a block device (a default disk: /dev/vdb
# under vagrant-libvirt, /dev/sdb under VirtualBox).
first_disk() {
    for disk in "$@"; do
        if [ -b "$disk" ]; then
            echo "$disk"
            return 0
        fi
    done
    return 1
}

# Refuse a disk that holds anything: a partition table, a filesystem, an LVM
# label, a mount.  These scripts wipe what they are given, so a wrong default
# (another disk naming) must stop here and not destroy data.
check_empty_disk() {
    [ -b "$1" ] || die "$1: not a block device"
    if grep -q "^$1 " /proc/mounts; then
        die "$1 is mounted: not touching it"
    fi
    found=$(blkid -p -o export "$1" 2>/dev/null | grep -E '^(PT)?TYPE=' | tr '\n' ' ') || true
    if [ -n "$found" ]; then
        die "$1 is not empty (${found% }): not touching it; if it is really free, wipefs -a $1"
    fi
}

# Bytes in a size like 10G, 512M, 100G (binary units, as LVM and Docker mean them).
bytes() {
    case $1 in  # numfmt alone would take "12 parsecs" for 12
        '' | [!0-9]* | *[!0-9KMGTP]*) die "bad size '$1' (e.g. 512M, 10G)" ;;
    esac
    numfmt --from=iec "$1" 2>/dev/null || die "bad size '$1' (e.g. 512M, 10G)"
}
