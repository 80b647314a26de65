"""The memory-allocator setting of linearize's own processes (the ``linearize`` command).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with its own mmap and unmaps
it on free, and trims freed heap memory back to the OS: each large activation of a forward is then
page-faulted in again, zero-filled, at every layer. On 2 CPU cores that made a converted SmolLM2's
prefill grow more than 2x per doubling of the context (faults: 0.25M at 2K, 0.52M at 4K, 1.97M at
8K tokens), and the teacher's too. ``keep_freed_memory`` makes the process keep freed memory for
reuse, as jemalloc/tcmalloc servers do; :func:`main` applies it before any verb runs (torch-free, so
``--help`` stays fast). Set ``LINEARIZE_ALLOCATOR=system`` to keep glibc's defaults.

Safe for these processes: memory is reused, not leaked; peak RSS is unchanged, only no longer
returned between forwards (``linearize bench`` hands it back between measurements with
``malloc_trim``). Threads other than the main one keep mmap for blocks their heaps cannot hold.
"""

from __future__ import annotations

import logging
import os

from ..environment import glibc

logger = logging.getLogger(__name__)

ALLOCATOR_ENV = "LINEARIZE_ALLOCATOR"
"""``system``: leave glibc's defaults. After :func:`keep_freed_memory` it reads ``retain`` (what
``linearize bench`` records)."""
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str:
    """Apply the setting where the C library is glibc and ``LINEARIZE_ALLOCATOR`` is not ``system``.
    Returns the mode in effect: ``retain`` or ``system``."""
    if os.environ.get(ALLOCATOR_ENV) == "system":
        return "system"
    libc = glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        logger.debug("not glibc: the allocator keeps its own defaults")
        return "system"
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        logger.warning("glibc refused mallopt(M_MMAP_MAX / M_TRIM_THRESHOLD): large tensors are page-faulted "
                       "in at every forward (slower prefill)")
        return "system"
    os.environ[ALLOCATOR_ENV] = "retain"
    return "retain"
