"""The process's memory: its peak, read per run, and freed heap given back to the OS.

Peak: Linux keeps the RSS high-water mark (VmHWM) per address space and resets it
when "5" is written to /proc/self/clear_refs, so a run inside a longer process (a
benchmark) can record its own peak.  Some sandboxes ignore that write; the reset is
checked and the peak labelled "process" wide when it did not take.

Freed heap (glibc only; a no-op elsewhere): torch allocates CPU tensors with
``posix_memalign``. Once glibc's dynamic mmap threshold has grown past a tensor's
size, that tensor comes from the heap, and a loop that frees large temporaries
between small long-lived results (the sweeps over chunks of groups, the layers'
activations) fragments it: the freed pages stay in the process's RSS.
``malloc_trim(0)`` returns every whole free page, wherever it sits in the heap, at
the cost of a walk over the free lists.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import threading
from pathlib import Path

import torch


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


_STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def process_memory_kb() -> dict[str, int]:
    """VmRSS, VmHWM and RSS's anonymous / file-backed split (mmapped weights are
    file-backed until written) of this process in kB, from /proc/self/status (empty
    off Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {
        key: int(rest.split()[0])
        for key, _, rest in (line.partition(":") for line in lines)
        if key in _STATUS_FIELDS
    }


_rss_window_reset = False  # did the last reset_peak_memory really restart VmHWM?


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window (see the module docstring)."""
    global _rss_window_reset
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    status = process_memory_kb()
    hwm, rss = status.get("VmHWM"), status.get("VmRSS")
    _rss_window_reset = hwm is not None and rss is not None and hwm <= rss + 4096


def peak_memory(device: torch.device) -> dict:
    """Peak RSS since :func:`reset_peak_memory` when that reset took, else of the
    whole process (``peak_rss_scope`` says which); the device's peak on CUDA."""
    hwm = process_memory_kb().get("VmHWM")
    rss_kb = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scope = "run" if hwm is not None and _rss_window_reset else "process"
    out = {"peak_rss_mb": rss_kb / 1024, "peak_rss_scope": scope}
    if device.type == "cuda":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


class AnonPeak:
    """The peak of the process's *anonymous* RSS while the block runs, by sampling.

    VmHWM also counts clean file-backed pages (a model's mmapped safetensors, which
    the kernel may drop under pressure), so it overstates what a run really holds and
    depends on how a tool loads its weights.  The private part (``RssAnon``) has no
    high-water mark in /proc, so a daemon thread reads it every ``interval`` seconds;
    a spike shorter than that can be missed.  ``peak_mb`` is None off Linux.

        with AnonPeak() as anon:
            work()
        anon.peak_mb
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._peak_kb: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        kb = process_memory_kb().get("RssAnon")
        if kb is not None and (self._peak_kb is None or kb > self._peak_kb):
            self._peak_kb = kb

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> AnonPeak:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float | None:
        return None if self._peak_kb is None else self._peak_kb / 1024
