"""glibc malloc set up to keep freed memory for reuse: ``keep_freed_memory()``.

ATen takes CPU tensors from malloc, and glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh mmap, unmapped again on free. A prefill step allocates many
such blocks (at 2048 tokens, top-8 and hidden 1024 each routed-experts temporary is 64 MiB in
fp32), so the next step touches fresh pages again: one page fault per 4 KiB, 16k per 64 MiB,
which cost a third of such a step (measured: 2,273 -> 1,555 ms, 2048 tokens, the `wide` bench
shape, fp32, 2 cores). A thread other than the main one allocates from an arena of its own,
whose heaps hold at most 64 MiB, so larger blocks are mmapped whatever the threshold.

Hence: one arena (the engine's forward runs on a worker thread), no mmap, no trimming. That
step then took 1.6-1.7 s, as with tcmalloc preloaded (1.6 s; jemalloc, which returns dirty
pages after a delay, 2.4-2.6 s), without a library to preload before the interpreter starts. The
heap then grows to the process's high-water mark and stays there, which is what a caching
allocator does; a server's high-water mark is bounded by its limits (batched tokens, KV pool).
Process-wide and only for glibc; call it before the serving threads start (an arena limit set
after a second thread has allocated does not apply to it). ``SPLITVL_MALLOC=system`` leaves
malloc as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV = "SPLITVL_MALLOC"
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_SETTINGS = (
    (_M_ARENA_MAX, 1),
    (_M_MMAP_MAX, 0),
    (_M_TRIM_THRESHOLD, -1),  # an int parameter: -1 reads as SIZE_MAX, never trim
    (_M_TOP_PAD, 64 << 20),  # grow the heap in steps of 64 MiB, not page by page
)


def keep_freed_memory() -> bool:
    """Set glibc's malloc up as above; False (and nothing changed) where it is not glibc, or
    $SPLITVL_MALLOC is "system"."""
    if os.environ.get(ENV, "").strip().lower() == "system":
        log.info("malloc: the system's settings ($%s=system)", ENV)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return False
    applied = all([libc.mallopt(param, value) == 1 for param, value in _SETTINGS])
    if applied:
        log.info("malloc: one arena, no mmap, no trim (freed tensors are reused, not unmapped)")
    else:
        log.warning("malloc: glibc refused a mallopt setting; page faults may slow large steps")
    return applied
