"""Keep freed tensor memory in the process instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (32 MiB at most on 64-bit Linux) with a
fresh ``mmap`` and gives it back with ``munmap`` when it is freed. A ViT forward on the CPU
allocates attention and MLP activations of that size in every block, so each of them comes back
as new pages that the kernel must fault in and zero: DeiT-Tiny at batch 100 on 2 cores ran at
43 img/s with about 600 000 page faults per batch, and at 55 img/s with none once glibc kept its
heap (measured 2026-11-26). PyTorch's CPU tuning guide gets the same effect by preloading
jemalloc or tcmalloc; ``mallopt`` gets it from inside the process, so ``python -m bench.run``
needs no wrapper. The arithmetic is unchanged (same kernels, same 64-byte alignment), so
predictions are bit-identical; only time moves, for the reduced and the unreduced model alike.

Set ``FATR_MALLOC=default`` to leave glibc as it is (e.g. to compare, or under a preloaded
allocator, where this has no effect anyway).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_KEEP_AT_TOP = 1 << 30  # free memory at the top of the heap kept before shrinking it (bytes)

_state: str | None = None


def keep_freed_memory() -> str:
    """Switch glibc to reusing its heap (once per process); returns what the process now uses,
    for the record: ``"glibc heap kept"``, ``"default (FATR_MALLOC=default)"`` or
    ``"default (not glibc)"``."""
    global _state
    if _state is None:
        _state = _switch()
    return _state


def _switch() -> str:
    if os.environ.get("FATR_MALLOC", "").strip().lower() == "default":
        return "default (FATR_MALLOC=default)"
    if not sys.platform.startswith("linux"):
        return "default (not glibc)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (not glibc)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _KEEP_AT_TOP)):
        return "default (mallopt refused)"
    return "glibc heap kept"
