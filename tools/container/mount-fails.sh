# shellcheck shell=sh
# A mount that is expected to fail: print fusepool's stderr, then check that it was one line,
# the exit status 1, nothing mounted and the pool not left locked (create works after it).
fusepool init pool --data-size 1G >/dev/null && mkdir -p mnt
fusepool mount pool mnt 2>err; rc=$?
cat err; echo "stderr lines: $(wc -l <err), exit status: $rc"
if grep -q " $PWD/mnt " /proc/mounts; then echo "still mounted"; exit 1; fi
fusepool create pool after --size 1M >/dev/null || exit 1
[ "$rc" = 1 ] && [ "$(wc -l <err)" = 1 ] && echo "failed cleanly: one line, exit 1, not mounted, pool unlocked"
