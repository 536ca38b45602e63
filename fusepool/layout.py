"""Names of the files in a pool directory (see docs/design.md, "The pool directory").

Kept apart from config.py so that commands which only talk to a mount daemon
import nothing heavier than this.
"""

DATA = "data"  # the data image
METADATA = "metadata"  # the metadata file
JOURNAL = "journal"  # the sync journal (fusepool/metadata/journal.py)
CONFIG = "pool.json"
LOCK = "lock"
SOCKET = "control.sock"  # the mount daemon's control socket
LOG = "fusepool.log"  # the background daemon's log
