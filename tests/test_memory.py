"""Per-run peak memory in a long-lived process, and the /proc fields it rests on."""

import time

import pytest
import torch

from neuqi import memory
from neuqi.memory import (
    AnonPeak,
    peak_memory,
    process_memory_kb,
    release_freed_memory,
    reset_peak_memory,
)


def test_process_memory_reads_rss_and_its_high_water_mark():
    mem = process_memory_kb()
    if not mem:
        pytest.skip("no /proc/self/status on this system")
    assert {"VmHWM", "VmRSS"} <= set(mem) <= {"VmHWM", "VmRSS", "RssAnon", "RssFile"}
    assert 0 < mem["VmRSS"] <= mem["VmHWM"]
    if "RssAnon" in mem:
        assert mem["RssAnon"] + mem["RssFile"] <= mem["VmRSS"] + 1


def test_peak_memory_is_per_run_after_a_reset():
    """A benchmark runs many jobs in one process: each must record its own peak."""
    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20)  # 256 MB
    big.add_(1)
    before = peak_memory(cpu)["peak_rss_mb"]
    del big
    release_freed_memory()  # glibc may keep the freed pages otherwise
    rss_now = process_memory_kb().get("VmRSS", 0) / 1024
    if rss_now > before - 200:
        pytest.skip("the allocator kept the freed pages: no lower peak to tell apart")
    reset_peak_memory(cpu)
    after = peak_memory(cpu)
    if after["peak_rss_scope"] == "process":
        pytest.skip("no /proc/self/clear_refs on this system")
    assert after["peak_rss_mb"] < before - 200


def test_peak_memory_says_process_wide_when_the_reset_did_not_take(monkeypatch):
    """Sandboxes may ignore /proc/self/clear_refs: the peak must not then claim to be the run's."""
    monkeypatch.setattr(memory, "process_memory_kb", lambda: {"VmHWM": 900_000, "VmRSS": 300_000})
    reset_peak_memory(torch.device("cpu"))
    mem = peak_memory(torch.device("cpu"))
    assert mem == {"peak_rss_mb": 900_000 / 1024, "peak_rss_scope": "process"}
    monkeypatch.setattr(memory, "process_memory_kb", lambda: {"VmHWM": 300_000, "VmRSS": 300_000})
    reset_peak_memory(torch.device("cpu"))
    assert peak_memory(torch.device("cpu"))["peak_rss_scope"] == "run"


def test_anon_peak_catches_a_freed_transient_and_not_what_follows():
    """A run's private peak: a 256 MB temporary freed inside the block still counts,
    an allocation after the block does not."""
    if "RssAnon" not in process_memory_kb():
        pytest.skip("no RssAnon in /proc/self/status on this system")
    base = process_memory_kb()["RssAnon"] / 1024
    with AnonPeak(interval=0.01) as anon:
        tmp = torch.ones(64 * 2**20)  # 256 MB, touched
        tmp.add_(1)
        time.sleep(0.1)
        del tmp
        release_freed_memory()
    after = torch.ones(128 * 2**20)  # 512 MB once the block is over
    after.add_(1)
    assert base + 200 < anon.peak_mb < base + 450 and float(after[0]) == 2.0
