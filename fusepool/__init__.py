"""fusepool: a dm-thin style thin pool in user space, served over FUSE.

The engine (:class:`fusepool.engine.Pool`) is plain Python; the FUSE filesystem
(:mod:`fusepool.fs`), the control socket (:mod:`fusepool.control`) and the CLI
(:mod:`fusepool.cli`) are adapters over it.  Importing this package imports
nothing heavy so that short CLI commands start fast.
"""

__version__ = "0.1.0"
