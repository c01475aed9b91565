"""What every peer runner shares.  Runs inside a peer's own virtual environment,
so it imports only torch, transformers and safetensors — never neuqi.

A runner is called as ``python RUNNER.py JOB.json``; the job names the model, the
calibration windows (``windows.pt``, token ids ``[n, seqlen]`` written by
``bench/peers.py`` with neuqi's own sampler), bits, group size (-1 = channel-wise),
the variant and the output folder.  It writes ``OUT/model/`` (dense FP16 weights
holding the tool's quantize-dequantize values, so our evaluation reads every tool
the same way), the tool's own checkpoint under ``OUT/native/`` when it writes one
(for its size), and ``OUT/peer.json``.  A failure writes ``peer.json`` with the
tool's own error instead.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's own RSS high-water mark.  ``VmHWM`` belongs to the address space
    made at exec; ``ru_maxrss`` is not reset by exec on Linux, so a runner started by a
    large bench process would report that process's RSS as its own floor."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anon_rss_mb() -> float | None:
    """This process's private (anonymous) RSS now; None off Linux."""
    return _status_mb("RssAnon")


class _AnonSampler(threading.Thread):
    """Peak of the anonymous RSS, sampled every 0.1 s: VmHWM also counts the clean
    file-backed pages of mmapped weights, which depend on how a tool loads a model
    (neuqi.memory.AnonPeak does the same for our runs; this file cannot import neuqi)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: float | None = anon_rss_mb()

    def sample(self) -> float | None:
        """Take one reading now; the peak so far."""
        now = anon_rss_mb()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now
        return self.peak

    def run(self) -> None:
        while True:
            time.sleep(0.1)
            self.sample()


_ANON = _AnonSampler()
_ANON_AT_QUANTIZED: list[float | None] = []

# The process's peak when the tool's quantization call returned (set by ``timed``):
# model loading plus quantization, as our runs record theirs; what the runner does
# afterwards (reading the checkpoint back, a dense copy for our evaluation) is ours.
_PEAK_AT_QUANTIZED: list[float] = []


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_dense(model_path: str, weights: dict, out: Path) -> None:
    """A plain FP16 copy of the model with ``weights`` (name -> tensor) swapped in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float16)
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise KeyError(f"quantized weights with no match in the FP model: {missing[:3]}")
    with torch.no_grad():
        for name, w in weights.items():
            if params[name].shape != w.shape:
                raise ValueError(f"{name}: shape {tuple(w.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(w.to(torch.float16))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)


def check_levels(weights: dict, bits: int, group_size: int) -> None:
    """Refuse weights that are not on a ``2**bits``-level grid per group: a tool that
    silently skipped a layer must not pass for a quantized one."""
    import torch

    for name, w in weights.items():
        w = w.float()
        g = w.shape[1] if group_size == -1 else group_size
        if w.shape[1] % g:
            continue  # a partial last group: the tool decides how it is padded
        v = torch.sort(w.reshape(-1, g), dim=1).values
        levels = 1 + (v[:, 1:] != v[:, :-1]).sum(dim=1)
        if int(levels.max()) > 2**bits:
            raise RuntimeError(f"{name}: {int(levels.max())} distinct values in a group, "
                               f"more than 2**{bits}: not quantized")


def linear_names(model) -> list[str]:
    """The decoder's linear layers (the lm_head stays FP, as in every tool's default)."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def main(run: Callable[[dict, Path], dict], tool: str) -> None:
    """Load the job, run ``run(job, out)`` (returns the tool-specific record), write
    ``peer.json``; the tool's exception becomes the record's ``error``."""
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    record = {"tool": tool, "variant": job["variant"], "bits": job["bits"], "group_size": job["group_size"]}
    _ANON.start()
    t0 = time.perf_counter()
    try:
        record.update(run(job, out))
        record["native_bytes"] = folder_bytes(out / "native")
    except Exception as exc:  # the table shows the tool's own error and the bench goes on
        record["error"] = f"{type(exc).__name__}: {exc}".strip()[:600]
        record["traceback"] = traceback.format_exc()[-3000:]
    record["wall_seconds"] = time.perf_counter() - t0
    record["peak_rss_mb"] = _PEAK_AT_QUANTIZED[-1] if _PEAK_AT_QUANTIZED else peak_rss_mb()
    record["peak_rss_scope"] = "through the quantization call" if _PEAK_AT_QUANTIZED else "whole runner"
    record["runner_peak_rss_mb"] = peak_rss_mb()
    record["peak_anon_mb"] = _ANON_AT_QUANTIZED[-1] if _ANON_AT_QUANTIZED else _ANON.peak
    write_json(out / "peer.json", record)
    print(json.dumps({k: v for k, v in record.items() if k != "traceback"}))


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), seconds)``; also notes the peak RSS at that point (see ``_PEAK_AT_QUANTIZED``)."""
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    _PEAK_AT_QUANTIZED.append(peak_rss_mb())
    _ANON_AT_QUANTIZED.append(_ANON.sample())
    return value, seconds
