"""Shared memory between the services on one host: a pool the language side owns, the encode
side writes into, and tensors that are views of it (no copy on the receiving side).

The language service creates the pool as a file in /dev/shm, the encode service maps it by
name, and the language service unlinks the name at once: from then on the memory exists only
as long as one of the two processes maps it, so the kernel reclaims it whatever way either
process ends (kill -9 included). The name carries the creator's pid, and a start-up sweep
removes files a creator killed in the millisecond between creating and unlinking left behind.

Regions are page-aligned; a region goes back to the pool when the last tensor viewing it is
garbage collected (the tensor keeps its numpy base array alive, which carries the finalizer).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import threading
import weakref
from bisect import insort
from pathlib import Path

import numpy as np
import torch

SHM_DIR = Path("/dev/shm")
PREFIX = "splitvl-ipc-"
PAGE = mmap.PAGESIZE
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[0-9a-f]+$")


class ShmError(OSError):
    """Shared memory cannot be created, mapped or used here."""


def new_pool_path() -> Path:
    return SHM_DIR / f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"


def sweep_stale() -> list[Path]:
    """Remove pool files whose creator is gone (it died before unlinking them)."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.iterdir():
        match = _NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def map_file(path: Path, size: int, create: bool) -> mmap.mmap:
    """Map `size` bytes of a shared-memory file (creating it exclusively, or an existing one)."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ShmError(f"cannot {'create' if create else 'open'} {path}: {exc}") from exc
    try:
        if create:
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size < size:
            raise ShmError(f"{path} holds {os.fstat(fd).st_size} bytes, not {size}")
        return mmap.mmap(fd, size)
    except OSError as exc:
        if create:
            path.unlink(missing_ok=True)
        raise ShmError(f"cannot map {path}: {exc}") from exc
    finally:
        os.close(fd)


class RegionPool:
    """First-fit page-aligned regions of one mapping; thread-safe (frees come from finalizers
    on whatever thread drops the last view)."""

    def __init__(self, mapping: mmap.mmap, size: int) -> None:
        self.mapping = mapping
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), by offset
        self._lock = threading.Lock()
        self.num_live = 0

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(length for _, length in self._free)

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a region of at least `nbytes`, or None when none is free."""
        need = _pages(nbytes)
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= need:
                    if length == need:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + need, length - need)
                    self.num_live += 1
                    return offset
        return None

    def release(self, offset: int, nbytes: int) -> None:
        with self._lock:
            self._give_back(offset, _pages(nbytes))
            self.num_live -= 1

    def shrink(self, offset: int, nbytes: int, used: int) -> None:
        """Keep only the first `used` bytes of a region of `nbytes` (the rest goes back)."""
        keep = _pages(used)
        if keep < _pages(nbytes):
            with self._lock:
                self._give_back(offset + keep, _pages(nbytes) - keep)

    def _give_back(self, offset: int, length: int) -> None:
        insort(self._free, (offset, length))
        merged: list[tuple[int, int]] = []
        for start, size in self._free:  # coalesce neighbours
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self._free = merged

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """A tensor over the region (no copy); the region is released when it and every view
        of it are gone."""
        base = np.frombuffer(self.mapping, dtype=np.uint8, count=nbytes, offset=offset)
        weakref.finalize(base, self.release, offset, nbytes)
        return torch.from_numpy(base).view(dtype).view(*shape)


def _pages(nbytes: int) -> int:
    """`nbytes` rounded up to whole pages (at least one)."""
    return max(PAGE, -(-nbytes // PAGE) * PAGE)


def write_region(mapping: mmap.mmap, offset: int, tensor: torch.Tensor) -> int:
    """Copy `tensor`'s bytes into the mapping at `offset` (the one copy of the transport)."""
    flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
    nbytes = flat.numel()
    if offset < 0 or offset + nbytes > len(mapping):
        raise ShmError(f"region {offset}+{nbytes} is outside the {len(mapping)}-byte pool")
    target = torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset))
    target.copy_(flat)
    return nbytes
