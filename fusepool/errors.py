"""Domain errors raised by the engine.

Every error a user can cause or meet is a :class:`PoolError` subclass carrying
an errno (what the FUSE adapter returns to the kernel) and an exit status (what
the CLI returns: 1 when an operation fails, 2 for a usage error).  Adapters map
these in one place each; nothing else should escape the engine.
"""

import errno


class PoolError(Exception):
    """Base class: an operation on the pool failed; the message says why."""

    errno = errno.EIO
    exit_status = 1


class UsageError(PoolError):
    """The request itself is malformed (bad size, bad name, bad option)."""

    errno = errno.EINVAL
    exit_status = 2


class InvalidArgument(PoolError):
    """The request is well-formed but not allowed (e.g. shrinking a volume)."""

    errno = errno.EINVAL


class NoSuchVolume(PoolError):
    errno = errno.ENOENT


class VolumeExists(PoolError):
    errno = errno.EEXIST


class NotAPool(PoolError):
    errno = errno.ENOENT


class PoolBusy(PoolError):
    """Another process holds the pool (a mount daemon or another command)."""

    errno = errno.EBUSY


class PoolFull(PoolError):
    """No free data block for an allocating write (dm-thin: out of data space)."""

    errno = errno.ENOSPC


class MetadataFull(PoolError):
    """No room left in the metadata file for the running transaction."""

    errno = errno.ENOSPC


class BelowMinFreeSpace(PoolError):
    """Creating a volume/snapshot would dip under the minimum free space."""

    errno = errno.ENOSPC


class ReadOnlyPool(PoolError):
    """The pool stopped accepting changes (metadata full or an I/O error)."""

    errno = errno.EROFS


class PoolFailed(ReadOnlyPool):
    """An I/O error or an internal error: the pool turned read-only and needs checking.

    What the failed operation itself gets, and a later fsync with unflushed
    data (EIO, not EROFS: the data is not durable); later changes get a plain
    :class:`ReadOnlyPool`.
    """

    errno = errno.EIO


class Corrupt(PoolError):
    """Metadata failed a checksum or an invariant: never used silently."""

    errno = errno.EIO


class NotMounted(PoolError):
    errno = errno.EINVAL


class DaemonTimeout(PoolError):
    """The mount daemon did not take a request in time; the request was not carried out."""

    errno = errno.ETIMEDOUT


class StateUnknown(PoolError):
    """The mount daemon took a changing request but gave no answer: it may or may not be done.

    Its own exit status, so scripts can tell "failed, nothing changed" (1) from
    "don't know" (3) after a time-out.
    """

    errno = errno.ETIMEDOUT
    exit_status = 3


class PermissionDenied(PoolError):
    """The caller is neither the pool's owner (the user who mounted it) nor root."""

    errno = errno.EACCES
