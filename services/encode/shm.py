"""The encode side of the shared-memory transport: the language services' pools it has mapped.

A client opens a pool with OpenShm, a stream it keeps open for as long as it uses the pool: the
mapping is dropped when that stream ends, however the client ended (a killed client's stream is
cancelled), so a dead client's memory is freed with it. An Encode call with the shared-memory
transport leaves each tensor under a ticket (as the link transport does); CopyToShm writes it
into a region the client allocated in its pool.
"""

from __future__ import annotations

import itertools
import logging
import mmap
from pathlib import Path

import torch

from shared.wire.shm import PREFIX, SHM_DIR, ShmError, map_file, write_region

log = logging.getLogger(__name__)


class UnknownPoolError(LookupError):
    """No open pool has this id (its client closed it, or the service restarted)."""


class ShmPools:
    """Pools mapped from clients, by id."""

    def __init__(self, max_pools: int = 64) -> None:
        self.max_pools = max_pools
        self._pools: dict[str, mmap.mmap] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._pools)

    def open(self, path: str, size: int) -> str:
        """Map a client's pool file; the client unlinks it once this returns."""
        file = Path(path)
        if file.parent != SHM_DIR or not file.name.startswith(PREFIX):
            raise ShmError(f"{path} is not a splitvl pool in {SHM_DIR}")
        if len(self._pools) >= self.max_pools:
            raise ShmError(f"{len(self._pools)} pools are open, the most this service maps")
        mapping = map_file(file, size, create=False)
        pool_id = f"pool-{next(self._ids)}"
        self._pools[pool_id] = mapping
        log.info("shared-memory pool %s mapped: %s, %d MiB", pool_id, path, size >> 20)
        return pool_id

    def close(self, pool_id: str) -> None:
        mapping = self._pools.pop(pool_id, None)
        if mapping is not None:
            mapping.close()
            log.info("shared-memory pool %s unmapped", pool_id)

    def write(self, pool_id: str, offset: int, tensor: torch.Tensor) -> int:
        """Copy `tensor` into the pool at `offset`; the bytes written."""
        mapping = self._pools.get(pool_id)
        if mapping is None:
            raise UnknownPoolError(f"no open pool {pool_id!r}; call OpenShm again")
        return write_region(mapping, offset, tensor)

    def close_all(self) -> None:
        for pool_id in list(self._pools):
            self.close(pool_id)
