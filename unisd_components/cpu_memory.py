"""glibc malloc tuning for training on CPU: keep freed memory in the process instead of unmapping it.

Why: glibc serves large allocations with ``mmap`` and returns them with ``munmap`` on free. A training step
allocates and frees dozens of vocabulary-sized fp32 buffers (``[B,T,V]`` is 50 MB for SmolLM2 at batch 4 x
64 tokens), so every step the kernel maps and zeroes them again: 100-400 thousand minor page faults per
step. Raising the mmap and trim thresholds keeps those blocks in the heap for the next step. Measured on the
2-core box (SDFT step, SmolLM2-135M, batch 4, 64 tokens): 9.9 -> 9.3 s per step, the backward pass 2.45 ->
2.1 s. The cost: the process keeps its peak heap instead of shrinking between steps.

Process-wide, so it is the application's call (the harness makes it in every process it trains in; the
step-time benchmark makes it for all the trainers it compares). Call it early, before the large
allocations. Linux with glibc only; elsewhere, or with ``UNISD_MALLOC_TUNING=0``, it does nothing.

Example::

    from unisd_components.cpu_memory import keep_freed_memory
    keep_freed_memory()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameters (malloc.h) and the values: blocks under 1 GiB come from the heap, and the heap's top
# is trimmed only above 2 GiB of free memory (values are C ints).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 1 << 30))

_applied = False


def keep_freed_memory() -> bool:
    """Apply the tuning once per process; return whether it is in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("UNISD_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    # Applied once the training stack is loaded, as it always was while importing this package loaded it
    # all. Measured (tests/test_cpu_memory.py's probe): applied to a fresh heap instead, 4 of 5 freed
    # 64 MB buffers are faulted in again; after torch + transformers are imported, none is. The callers
    # (harness run, its workers, the data-parallel processes) train next, so this costs them nothing.
    import unisd_components.trainer  # noqa: F401
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    return _applied
