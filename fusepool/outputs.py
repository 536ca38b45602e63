"""Files the commands write (``dump -o``, ``dump --names``, ``export``) and read (``import``).

Two rules from DESIGN.md 4 ("A pool belongs to its owner"):

- An output never follows a symlink and is owner-only: a new file is made
  with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600; an existing regular file
  the user names is overwritten (O_NOFOLLOW, truncated) and made 0600; a
  symlink as the last component is refused (a link planted in /tmp would
  otherwise send root's output into another user's file).
- Neither an output nor an input is a file of the pool itself: writing the
  pool's metadata over itself destroys the pool, and reading its own data
  file while writing it is no copy.  A path is a file of the pool if it is,
  or resolves to, an entry of the pool directory (same device and inode:
  also through another name, a symlinked directory or a hard link), a new
  name inside the pool directory, or the data device of a direct-mode pool
  (same block device, whatever the node's name).
"""

import errno
import os
import stat

from fusepool.errors import InvalidArgument, PoolError

OUTPUT_MODE = 0o600


class PoolFiles:
    """What makes up one pool on the host: its directory, its files, its data device."""

    def __init__(self, pool_dir: str):
        self.pool_dir = os.path.realpath(pool_dir)
        self.inodes: set[tuple[int, int]] = set()
        self.devices: set[int] = set()  # st_rdev of the direct-mode data device
        st = os.stat(self.pool_dir)
        self.inodes.add((st.st_dev, st.st_ino))
        for name in os.listdir(self.pool_dir):
            try:
                st = os.lstat(os.path.join(self.pool_dir, name))
            except FileNotFoundError:
                continue
            self.inodes.add((st.st_dev, st.st_ino))
        data_device = self._data_device()
        if data_device:
            try:
                st = os.stat(data_device)
            except OSError:
                pass
            else:
                self.inodes.add((st.st_dev, st.st_ino))
                if stat.S_ISBLK(st.st_mode):
                    self.devices.add(st.st_rdev)

    def _data_device(self) -> str | None:
        from fusepool.config import PoolConfig

        try:
            return PoolConfig.load(self.pool_dir).data_device
        except PoolError:
            return None

    def owns(self, st: os.stat_result) -> str | None:
        """What of the pool ``st`` is, or None."""
        if stat.S_ISBLK(st.st_mode) and st.st_rdev in self.devices:
            return f"the data device of pool {self.pool_dir}"
        if (st.st_dev, st.st_ino) in self.inodes:
            return f"a file of pool {self.pool_dir}"
        return None

    def check_path(self, path: str, what: str) -> None:
        """Refuse ``path`` (InvalidArgument) if it is, or would be made, a file of the pool.

        ``what``: "output" or "input", for the message.
        """
        action = ("refusing to overwrite the pool with itself" if what == "output" else
                  "a pool cannot be read into itself")
        try:
            st = os.stat(path)  # following links: where the bytes would really go
        except OSError:
            st = None
        owned = self.owns(st) if st is not None else None
        if owned:
            raise InvalidArgument(f"{what} {path} is {owned}: {action}")
        parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        inside = parent == self.pool_dir or parent.startswith(self.pool_dir.rstrip("/") + "/")
        if not inside:
            try:
                pst = os.stat(parent)
            except OSError:
                pst = None
            # (the pool directory seen through a bind mount has another path, the same inode)
            inside = pst is not None and (pst.st_dev, pst.st_ino) in self.inodes
        if inside:
            raise InvalidArgument(f"{what} {path} is inside pool directory {self.pool_dir}: {action}")


def check_output(path: str, pool_dir: str | None = None) -> None:
    """The checks of :func:`open_output`, without opening: to refuse before doing any work."""
    if os.path.islink(path):
        raise InvalidArgument(f"output {path} is a symlink: refusing to write through it "
                         "(give the path it points to)")
    if pool_dir is not None:
        PoolFiles(pool_dir).check_path(path, "output")


def open_output(path: str, pool_dir: str | None = None) -> int:
    """Open ``path`` for writing as the rules above say; returns the descriptor."""
    pool = PoolFiles(pool_dir) if pool_dir is not None else None
    if pool is not None:
        pool.check_path(path, "output")
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, OUTPUT_MODE)
        created = True
    except FileExistsError:
        created = False
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidArgument(f"output {path} is a symlink: refusing to write through it "
                                 "(give the path it points to)") from None
            raise InvalidArgument(f"output {path}: {exc.strerror}") from None
    except OSError as exc:
        raise InvalidArgument(f"output {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        owned = pool.owns(st) if pool is not None else None
        if owned:  # (it changed since the check above)
            raise InvalidArgument(f"output {path} is {owned}: refusing to overwrite the pool with itself")
        if stat.S_ISREG(st.st_mode):
            if created or st.st_uid == os.geteuid():
                os.fchmod(fd, OUTPUT_MODE)  # explicit, whatever the umask or the old mode
            if not created:
                os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_input(path: str, pool_dir: str, mountpoint: str | None = None) -> None:
    """Refuse an input that is a file of the pool, or a volume in the pool's own mount."""
    PoolFiles(pool_dir).check_path(path, "input")
    if mountpoint is not None:
        try:
            same = os.stat(path).st_dev == os.stat(mountpoint).st_dev
        except OSError:
            return
        if same:
            raise InvalidArgument(f"input {path} is a volume of this pool's mount {mountpoint}: use "
                             "`fusepool snapshot` to copy a volume")


def check_restore_data(data_path: str, pool_dir: str) -> None:
    """``restore --data`` must not name the pool being made, or anything inside it."""
    dest = os.path.realpath(pool_dir)
    data = os.path.realpath(data_path)
    if data == dest or data.startswith(dest.rstrip("/") + "/"):
        raise InvalidArgument(f"data image {data_path} is inside the destination pool {dest}: "
                              "a pool cannot be restored from itself")
