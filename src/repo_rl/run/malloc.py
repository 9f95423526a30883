"""glibc allocator settings that keep a training process's resident memory down.

glibc serves a large allocation with its own mapping (returned to the OS on ``free``) only
above ``M_MMAP_THRESHOLD``, and by default it *raises* that threshold to the size of each
large block freed, up to 32 MiB. A training step frees many blocks of a few MiB (activations,
logits, gradients), so after the first step they are carved from the heap instead, and the
heap keeps the freed space: resident memory stays at the step's peak and later peaks stack
on top of fragments. Setting the threshold explicitly turns the adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def set_mmap_threshold(kb: int) -> bool:
    """Pin glibc's mmap threshold to ``kb`` KiB. Returns False where there is no glibc (or ``kb`` is 0)."""
    if kb <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(kb) * 1024))
