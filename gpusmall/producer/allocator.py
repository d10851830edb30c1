"""Host allocator settings for event-by-event processing (called by the command line, not on import).

NumPy takes every array above 128 KiB from glibc, which by default maps it freshly from the kernel
(``mmap``) and returns it on free. A batch pipeline makes the same large temporaries (a batch of
float32 frames, masks) again for every batch, so each batch pays the kernel for zeroing and mapping
those pages again: on a 512 x 512 camera run this was 30% of the run time as system time
(BENCHMARKS.md). :func:`keep_freed_memory` raises glibc's mmap and trim thresholds so freed blocks
stay in the process heap and are reused by the next batch. The cost: the process keeps its peak
host memory until it exits, which a producer holds anyway. Elsewhere than glibc (macOS, musl) it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to 2 GiB come from the heap (and stay there once freed)
THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds for this process; True when glibc took them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    log.debug("glibc mmap/trim thresholds %s", "raised" if ok else "unchanged")
    return ok
