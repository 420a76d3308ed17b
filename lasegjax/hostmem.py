"""Host memory allocator settings for XLA's CPU backend (Linux with glibc)."""

import ctypes
import logging
import os
import sys

# mallopt parameters from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 2**30
TRIM_THRESHOLD_BYTES = 2**31 - 1
ENVIRONMENT_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def reuse_freed_memory() -> bool:
    """Make glibc reuse freed buffers of up to 1 GiB instead of unmapping them.

    XLA's CPU backend allocates the buffers of each step anew. glibc serves an allocation
    above its mmap threshold with its own mmap and unmaps it when it is freed. By default
    that threshold starts at 128 KiB and rises with use to at most 32 MiB on 64-bit
    systems (mallopt(3)), and glibc also returns the freed top of its heap to the kernel.
    So every step touches fresh pages that the kernel must zero. On the demo train step
    (2 CPU devices on 2 cores) that kernel work kept 0.3 cores busy, and the step took
    109 ms instead of 94 ms. The price is that the process keeps the memory it freed, so
    its peak resident size stays reserved.

    mallopt(3) gives 32 MiB as the upper limit of M_MMAP_THRESHOLD, but glibc 2.36 accepted
    1 GiB. A threshold of 32 MiB left the kernel time unchanged (the demo step has 37 MiB
    of temporaries per device), while 256 MiB and 1 GiB removed it. A glibc that refuses
    the value keeps its defaults, with a warning.

    Returns whether both settings were applied. It does nothing outside Linux, with a C
    library other than glibc, or when MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is
    set in the environment (the user's own choice).
    """
    if not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in ENVIRONMENT_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    applied = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and applied
    if not applied:
        logging.warning("glibc's mallopt refused the malloc thresholds; they stay at defaults.")
    return applied
