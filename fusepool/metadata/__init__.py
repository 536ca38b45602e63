"""The transactional mapping store.

- :mod:`.format`   the durable format: pages, checksums, superblocks, the root record
- :mod:`.tree`     copy-on-write mapping trees (virtual block -> data block + time)
- :mod:`.spacemap` data block reference counts and the allocator
- :mod:`.store`    the metadata file: page allocation, commit and recovery
"""
