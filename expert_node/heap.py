"""How this process's C heap (glibc's malloc) keeps or returns freed memory. The two kinds of
process want opposite policies: an expert node gives request-sized buffers back at once (memory
is what it offers), the engine keeps its per-layer buffers for the next layer (page faults are
time). No-ops off glibc."""
from __future__ import annotations

import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h


@functools.cache
def glibc_malloc():
    """The C library when it is glibc (mallopt, malloc_trim), else None. Looked up once: ctypes'
    find_library runs ldconfig."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_large_buffers_to_the_system(threshold: int = 1 << 20) -> None:
    """Have glibc map every buffer of `threshold` bytes or more on its own, so freeing one gives
    the memory back. By default glibc raises that threshold to the largest buffer freed so far
    (up to 32 MB), after which request-sized buffers stay in the heap: a node held 55 MB after
    refusing a few crafted requests."""
    if glibc_malloc():
        glibc_malloc().mallopt(M_MMAP_THRESHOLD, threshold)


def keep_large_buffers(threshold: int = 256 << 20) -> None:
    """Have glibc serve buffers below `threshold` bytes from the heap and keep up to twice that
    freed there, instead of mapping each one afresh. A prefill allocates and frees arrays of 8-32
    MB in every layer (the experts' outputs of 512 tokens x 8 experts x 2048 are 32 MB, glibc's
    largest heap buffer by default), and a fresh mapping costs a page fault and a zeroed page per
    4 KB: 168k faults in four 512-token prefills of an 8-layer Qwen3, 61k with this (the rest is
    loading), 2-3% of the prefill. The heap then holds what a prefill's layer used, not more."""
    if glibc_malloc():
        glibc_malloc().mallopt(M_MMAP_THRESHOLD, threshold)
        glibc_malloc().mallopt(M_TRIM_THRESHOLD, 2 * threshold)


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim). After a refused
    oversized request: gRPC receives a message in slices below the mmap threshold, so even with
    return_large_buffers_to_the_system a node kept 26-56 MB after refusing one 16 MB request."""
    if glibc_malloc():
        glibc_malloc().malloc_trim(0)
