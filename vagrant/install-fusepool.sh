#!/bin/sh
# Install fusepool in the box: the project's own tools/setup (Debian packages,
# then a virtualenv in the project's .venv with fusepool in it).
#
#   FUSEPOOL_DIR   the project checkout (default: the parent of this directory,
#                  /fusepool in the Vagrant box)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

project=${FUSEPOOL_DIR:-$(dirname "$here")}
need_root
[ -x "$project/tools/setup" ] || die "$project/tools/setup not found: set FUSEPOOL_DIR to the checkout"
run "$project/tools/setup"
run "$project/.venv/bin/fusepool" --help >/dev/null
log "ready: $project/.venv/bin/fusepool"
