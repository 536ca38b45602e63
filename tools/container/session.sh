# shellcheck shell=sh
# README's session, run inside a container by tools/container-recipes (sh, cwd writable).
set -e
fusepool init pool --data-size 1G && mkdir -p mnt && fusepool mount pool mnt
fusepool create pool base --size 64M && mkfs.ext4 -q mnt/base
fusepool snapshot pool base base-snap && fusepool list pool
fusepool info pool | grep -E 'Volumes|Mounted At'
fusepool umount mnt
echo SESSION-OK
