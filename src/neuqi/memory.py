"""Giving freed heap memory back to the OS (glibc only; a no-op elsewhere).

torch allocates CPU tensors with ``posix_memalign``.  Once glibc's dynamic mmap
threshold has grown past a tensor's size, that tensor comes from the heap, and a
loop that frees large temporaries between small long-lived results (the sweeps
over chunks of groups, the layers' activations) fragments it: the freed pages stay
in the process's RSS.  ``malloc_trim(0)`` returns every whole free page, wherever
it sits in the heap, at the cost of a walk over the free lists.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (see the module docstring)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
