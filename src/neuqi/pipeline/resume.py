"""Resumable runs: what a run has finished, saved after every decoder layer.

A run of hours must survive Ctrl-C, a killed process or a full disk. After layer
``k`` the folder ``<out_dir>/.<run_name>.resume/`` holds

* ``layer-0000k.safetensors``: that layer's packed codes, parameters and biases,
  its per-linear stats in the metadata;
* ``hidden-0000{k+1}.safetensors``: the calibration activations entering layer
  ``k+1`` (``[b, seqlen, hidden]`` per batch), exactly as the run computed them;
* ``state.json``: ``layers_done = k+1`` and the run's fingerprint — the commit point.

Every file is written atomically and ``state.json`` last, so a crash at any moment
leaves a state naming only complete files; the previous ``hidden-*`` file is
removed only after ``state.json`` moved on. ``neuqi quantize --resume`` re-captures
the masks and rotary embeddings (cheap: embeddings only), takes the saved
activations and records, and continues at layer ``k+1``; as the quantizer is
deterministic, the checkpoint equals an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from neuqi.formats.checkpoint import QuantizedLinear
from neuqi.io_utils import atomic_path, atomic_write_json
from neuqi.quant.grid import QuantParams

log = logging.getLogger(__name__)

STATE_VERSION = 1


def state_folder(out_dir: Path | str, run_name: str) -> Path:
    return Path(out_dir) / f".{run_name}.resume"


def windows_digest(windows: Tensor) -> str:
    """sha256 of the calibration token ids ``[n, seqlen]``: a resumed run must see the same."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _record_tensors(name: str, q: QuantizedLinear) -> dict[str, Tensor]:
    t = {f"{name}.qweight": q.qweight, f"{name}.scale": q.params.scale, f"{name}.zero": q.params.zero}
    if q.params.offset is not None:
        t[f"{name}.offset"] = q.params.offset
    if q.bias is not None:
        t[f"{name}.bias"] = q.bias
    return {k: v.detach().cpu().contiguous() for k, v in t.items()}


def _record_from(tensors: dict[str, Tensor], name: str, meta: dict) -> QuantizedLinear:
    params = QuantParams(tensors[f"{name}.scale"], tensors[f"{name}.zero"], tensors.get(f"{name}.offset"))
    return QuantizedLinear(tensors[f"{name}.qweight"], meta["in_features"], meta["bits"], params,
                           tensors.get(f"{name}.bias"), meta["gguf_type"], meta["expert_of"])


@dataclass
class ResumeState:
    """The saved progress of one run (see the module docstring).

    ``fingerprint`` is everything that changes the result (options, model, dtype,
    calibration tokens); a state made under another fingerprint is refused.
    """

    folder: Path
    fingerprint: dict
    layers_done: int = 0
    resumed_from: int = 0  # layers_done when opened
    records: dict[str, QuantizedLinear] = field(default_factory=dict)
    stats: list[dict] = field(default_factory=list)
    # wall seconds each restored layer took in the run that made it (None: not recorded)
    layer_seconds: list[float | None] = field(default_factory=list)

    @classmethod
    def open(cls, folder: Path, fingerprint: dict, resume: bool, overwrite: bool = False,
             defaults: dict | None = None) -> ResumeState:
        """The state to continue (``resume``) or a fresh one.

        A saved state is never dropped silently: without ``resume`` it is an error
        unless ``overwrite``; with ``resume`` and another fingerprint, an error naming
        what differs.  A key of ``defaults`` that the saved fingerprint lacks (an option
        added to neuqi after that state was saved) counts as its default there."""
        path = folder / "state.json"
        if not path.exists():
            if resume:
                log.info("--resume: no saved state in %s; starting at layer 0", folder)
            shutil.rmtree(folder, ignore_errors=True)
            return cls(folder, fingerprint)
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}); delete {folder} to start over") from None
        if not resume:
            if overwrite:
                shutil.rmtree(folder)
                return cls(folder, fingerprint)
            raise FileExistsError(
                f"an interrupted run left its state in {folder} ({saved.get('layers_done')} of "
                f"{saved.get('n_layers')} layers done): pass --resume to continue it, or "
                f"--overwrite to start over")
        old = {**(defaults or {}), **(saved.get("fingerprint") or {})}
        if saved.get("version") != STATE_VERSION or old != fingerprint:
            diff = sorted(k for k in {*old, *fingerprint} if old.get(k) != fingerprint.get(k))
            raise ValueError(f"the saved state in {folder} is of another run (differs in {diff}); "
                             f"run without --resume and with --overwrite to start over")
        done = int(saved["layers_done"])
        state = cls(folder, fingerprint, done, done)
        for i in range(state.layers_done):
            state._read_layer(i)
        log.info("resuming %s after layer %d", folder.name, state.layers_done - 1)
        return state

    def _layer_path(self, i: int) -> Path:
        return self.folder / f"layer-{i:05d}.safetensors"

    def _hidden_path(self, i: int) -> Path:
        return self.folder / f"hidden-{i:05d}.safetensors"

    def _read_layer(self, i: int) -> None:
        path = self._layer_path(i)
        try:
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                meta = json.loads(f.metadata()["neuqi"])
            tensors = load_file(path)
        except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}); delete {self.folder} to start over") from None
        for name, m in meta["linears"].items():
            self.records[name] = _record_from(tensors, name, m)
        self.stats += meta["stats"]
        self.layer_seconds.append(meta.get("seconds"))

    @property
    def seconds_before(self) -> float | None:
        """Wall seconds the restored layers took when they were made (None when a state
        written before this was recorded lacks them)."""
        if any(s is None for s in self.layer_seconds):
            return None
        return float(sum(self.layer_seconds))

    def hidden(self, n_batches: int) -> list[Tensor]:
        """The saved activations entering layer ``layers_done``, one per batch."""
        path = self._hidden_path(self.layers_done)
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}); delete {self.folder} to start over") from None
        if len(tensors) != n_batches:
            raise ValueError(f"{path} holds {len(tensors)} batches, the run has {n_batches}")
        return [tensors[f"batch{b}"] for b in range(n_batches)]

    def save_layer(self, i: int, n_layers: int, records: dict[str, QuantizedLinear], stats: list[dict],
                   hidden: list[Tensor], seconds: float | None = None) -> None:
        """Layer ``i`` is finished: its records, then the next layer's inputs, then the commit."""
        tensors: dict[str, Tensor] = {}
        linears = {}
        for name, q in records.items():
            tensors.update(_record_tensors(name, q))
            linears[name] = {"in_features": q.in_features, "bits": q.bits, "gguf_type": q.gguf_type,
                             "expert_of": q.expert_of}
        meta = {"neuqi": json.dumps({"linears": linears, "stats": stats, "seconds": seconds}, default=float)}
        with atomic_path(self._layer_path(i), ".safetensors") as tmp:
            save_file(tensors, tmp, metadata=meta)
        with atomic_path(self._hidden_path(i + 1), ".safetensors") as tmp:
            save_file({f"batch{b}": h.detach().cpu().contiguous() for b, h in enumerate(hidden)}, tmp)
        atomic_write_json(self.folder / "state.json", {
            "version": STATE_VERSION, "layers_done": i + 1, "n_layers": n_layers,
            "fingerprint": self.fingerprint})
        self._hidden_path(i).unlink(missing_ok=True)
        self.layers_done = i + 1

    def finish(self) -> None:
        """The run is complete and in place: the state is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)
