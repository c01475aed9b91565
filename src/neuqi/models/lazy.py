"""Models larger than RAM: read one decoder layer at a time from safetensors shards.

The model is built with every parameter on the meta device (no memory).  The
embeddings, final norm and LM head are read up front; each decoder layer is
read just before it is quantized and released right after, its non-quantized
tensors (norms) kept for the checkpoint.  Peak memory is one layer plus the
calibration activations plus the top-level tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from neuqi.models.adapters import Adapter, decoder_layers

INDEX = "model.safetensors.index.json"


class ShardedCheckpoint:
    """Where every tensor of a (possibly sharded) safetensors folder lives."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").exists():
            with safe_open(self.folder / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{self.folder} has no safetensors weights (needed by --low-memory)")
        self.weight_map: dict[str, str] = weight_map

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for k in keys:
            if k not in self.weight_map:
                raise ValueError(f"tensor {k} is missing from {self.folder}")
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for fname, ks in by_file.items():
            with safe_open(self.folder / fname, "pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        return out


def empty_model(folder: Path, dtype: torch.dtype):
    """The architecture with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _set_param(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, nn.Parameter(tensor, requires_grad=False))


def _read_param(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.is_floating_point():
        t = t.to(dtype)
    if not torch.isfinite(t).all():
        raise ValueError(f"the model's {key} holds NaN/inf values; refusing to quantize it")
    return t


def materialize(module: nn.Module, prefix: str, ckpt: ShardedCheckpoint, dtype: torch.dtype) -> None:
    """Read ``module``'s parameters (named ``prefix + name`` on disk) into CPU memory."""
    names = [n for n, _ in module.named_parameters()]
    tensors = ckpt.read([prefix + n for n in names])
    for n in names:
        _set_param(module, n, _read_param(prefix + n, tensors[prefix + n], dtype))


def release(module: nn.Module) -> None:
    """Send ``module``'s parameters back to the meta device, freeing their memory."""
    for n, p in list(module.named_parameters()):
        _set_param(module, n, torch.empty_like(p, device="meta"))


def is_materialized(module: nn.Module) -> bool:
    return all(p.device.type != "meta" for p in module.parameters())


def load_top_level(model: nn.Module, adapter: Adapter, ckpt: ShardedCheckpoint, dtype: torch.dtype) -> None:
    """Everything outside the decoder layers: embeddings, final norm, LM head."""
    layers = decoder_layers(model, adapter)
    in_layers = {id(p) for p in layers.parameters()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, p in list(model.named_parameters()):
        if id(p) in in_layers or (tied and name == f"{adapter.lm_head}.weight"):
            continue
        _set_param(model, name, _read_param(name, ckpt.read([name])[name], dtype))
    if tied:
        model.tie_weights()
