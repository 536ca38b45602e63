# shellcheck shell=sh
# No /dev/fuse: serve the pool over NBD and use it with qemu-io, qemu-img and nbdinfo.
set -e
if [ -e /dev/fuse ]; then echo "/dev/fuse is here: this recipe is for containers without it"; exit 1; fi
fusepool init pool --data-size 1G
fusepool create pool disk --size 64M
fusepool serve pool --nbd unix:/tmp/nbd.sock        # returns once the socket is served
nbdinfo --list 'nbd+unix:///?socket=/tmp/nbd.sock' | grep -E 'export=|export-size'
qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd+unix:///disk?socket=/tmp/nbd.sock' | head -1
fusepool snapshot pool disk disk-snap
qemu-io -f raw -c 'write -P 0xcd 0 1M' 'nbd+unix:///disk?socket=/tmp/nbd.sock' | head -1
qemu-io -f raw -c 'read -P 0xab 0 1M' 'nbd+unix:///disk-snap?socket=/tmp/nbd.sock' | head -1
qemu-img convert -f raw -O qcow2 'nbd+unix:///disk-snap?socket=/tmp/nbd.sock' /tmp/snap.qcow2
qemu-img info /tmp/snap.qcow2 | grep 'virtual size'
fusepool stop pool
fusepool list pool
echo NBD-OK
