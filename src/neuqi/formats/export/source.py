"""What every export needs from a finished run: integer codes, scales, zero-points
and the dense tensors, read once from the native checkpoint."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from neuqi.formats.checkpoint import load_quantized
from neuqi.formats.qlinear import QuantExperts, QuantLinear

# Files a consumer needs beside the weights (tokenizer, generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
              "tokenizer.model")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LinearCodes:
    """One quantized linear: ``ŵ[o, i] = scale[o, g(i)] · (code[o, i] − zero[o, g(i)])``."""

    codes: Tensor  # [out, in] uint8
    scale: Tensor  # [out, n_groups] fp16 (as stored)
    zero: Tensor  # [out, n_groups] float32 (integers when zero_point == "int")
    bias: Tensor | None
    group_size: int  # resolved: in_features for channel-wise
    offset: Tensor | None = None  # [out, n_groups] float32: GGUF runs, ŵ = scale·code + offset

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


@dataclass
class ExportSource:
    run_dir: Path
    config: dict  # the model's config.json without quantization_config
    bits: int
    group_size: int  # as configured (-1 = channel-wise)
    zero_point: str  # "float" | "int" | "offset" (GGUF block types)
    act_order: bool
    linears: dict[str, LinearCodes]
    dense: dict[str, Tensor]  # every other tensor of the model, float32
    # MoE: ``linears`` holds each expert's matrices under the hub checkpoints' names
    moe: bool = False

    def dense_in(self, dtype: torch.dtype) -> dict[str, Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.dense.items()}

    def copy_side_files(self, out: Path) -> None:
        for name in SIDE_FILES:
            if (self.run_dir / name).exists():
                shutil.copy2(self.run_dir / name, out / name)


def read_source(run_dir: Path | str) -> ExportSource:
    """Load a native neuqi checkpoint (clear errors come from ``load_quantized``)."""
    run_dir = Path(run_dir)
    model = load_quantized(run_dir, dtype=torch.float32)
    raw = json.loads((run_dir / "config.json").read_text())
    qc = raw.pop("quantization_config")
    linears: dict[str, LinearCodes] = {}
    skip: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        gs = mod.in_features if mod.group_size == -1 else min(mod.group_size, mod.in_features)
        linears[name] = LinearCodes(
            codes=mod.codes(),
            scale=mod.scales.t().contiguous(),
            zero=mod.zero_values().t().contiguous(),
            bias=None if mod.bias is None else mod.bias.detach().float(),
            group_size=gs,
            offset=mod.offsets.t().contiguous() if mod.zero_point == "offset" else None,
        )
        skip.update(f"{name}.{k}" for k, _ in mod.named_buffers())
        skip.update(f"{name}.{k}" for k, _ in mod.named_parameters())
    if qc.get("experts"):
        skip |= _expert_linears(model, raw["model_type"], linears)
    dense = {k: v.detach() for k, v in model.state_dict().items() if k not in skip}
    if qc.get("experts"):
        dense = _hub_names(dense, raw["model_type"])
    if raw.get("tie_word_embeddings"):
        dense.pop("lm_head.weight", None)
    return ExportSource(run_dir, raw, qc["bits"], qc["group_size"], qc["zero_point"],
                        bool(qc.get("act_order")), linears, dense, bool(qc.get("experts")))


def _expert_linears(model, model_type: str, linears: dict[str, LinearCodes]) -> set[str]:
    """Add every expert's matrices to ``linears`` under the names the model's hub
    checkpoints (and vLLM) use — one expert, one matrix, gate_up split into gate and
    up rows (groups run along the input, so a row split keeps them whole); returns
    the packed tensors' names."""
    from neuqi.models.adapters import adapter_for

    adapter = adapter_for(model_type)
    layout = adapter.experts
    skip: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantExperts):
            continue
        module, _, param = name.rpartition(".")
        layer = module[: -len(layout.path) - 1]
        gs = mod.in_features if mod.group_size == -1 else min(mod.group_size, mod.in_features)
        for e in range(mod.n_experts):
            codes, scale, zero = mod.codes(e), mod.scales[e].t(), mod.zero_values(e).t()
            parts = {layout.hub_down: slice(None)} if param == layout.down else {
                layout.hub_gate: slice(0, mod.out_features // 2),
                layout.hub_up: slice(mod.out_features // 2, None)}
            for hub, rows in parts.items():
                linears[f"{layer}.{layout.hub_path}.{e}.{hub}"] = LinearCodes(
                    codes[rows].contiguous(), scale[rows].contiguous(), zero[rows].contiguous(), None, gs)
        skip.update(f"{name}.{k}" for k, _ in mod.named_buffers())
    return skip


def _hub_names(dense: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    from neuqi.models.adapters import adapter_for

    renames = adapter_for(model_type).experts.hub_renames
    out = {}
    for key, value in dense.items():
        for ours, hub in renames:
            key = key.replace(f".{ours}.", f".{hub}.")
        out[key] = value
    return out


def refuse_moe(src: ExportSource, fmt: str) -> None:
    if src.moe:
        raise ValueError(f"{src.run_dir.name} has quantized mixture-of-experts weights; the {fmt} export "
                         "does not write experts: use --format compressed-tensors (what vLLM serves "
                         "MoE models from)")


def require_int_zero(src: ExportSource, fmt: str) -> None:
    if src.zero_point != "int":
        raise ValueError(
            f"{fmt} stores integer zero-points, but {src.run_dir.name} has float zero-points "
            "(NeUQI): quantize with --init neuqi_int (or minmax) for this format, or export "
            "this run with --format hqq, which keeps float zero-points"
        )


def require_whole_groups(src: ExportSource, fmt: str) -> None:
    for name, lin in src.linears.items():
        if lin.shape[1] % lin.group_size:
            raise ValueError(
                f"{fmt} needs group_size to divide every input dimension; {name} has "
                f"{lin.shape[1]} inputs and group size {lin.group_size}: use a group size that "
                "divides it (64 for SmolLM2) or channel-wise"
            )
