"""The native packed checkpoint: save it atomically, load it back (with clear errors).

Layout (DESIGN.md): ``config.json`` with ``quantization_config.quant_method = "neuqi"``,
tokenizer files, ``model.safetensors`` (or shards + index) holding, for every
quantized linear ``L``, ``L.qweight``, ``L.scales``, ``L.zeros`` or ``L.qzeros``
(or, for GGUF block types, float32 ``L.scales`` and ``L.offsets``) and ``L.bias``;
everything else as in the FP model; ``neuqi_run.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from neuqi.formats.packing import pack_weight, pack_zeros
from neuqi.formats.qlinear import replace_experts, replace_linears
from neuqi.quant.gguf_types import GGUF_TYPES
from neuqi.quant.grid import QuantParams, QuantSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_BYTES = 4 << 30
INDEX = "model.safetensors.index.json"


@dataclass
class QuantizedLinear:
    """What the pipeline keeps per quantized linear until the checkpoint is written:
    the codes already packed (``qweight``, as stored: a model's uint8 codes would
    hold ``8/bits`` times the memory for the whole run), the params and the bias."""

    qweight: Tensor
    in_features: int
    bits: int
    params: QuantParams
    bias: Tensor | None = None
    gguf_type: str | None = None  # GGUF runs: this linear's type (types differ per linear)
    # MoE: the fused 3-D parameter this matrix is one expert of (records are named
    # ``<parameter>.<expert>``); the checkpoint stacks them back into that shape
    expert_of: str | None = None

    @classmethod
    def from_codes(
        cls, codes: Tensor, params: QuantParams, bits: int, bias: Tensor | None = None,
        gguf_type: str | None = None, expert_of: str | None = None,
    ) -> QuantizedLinear:
        """Pack ``codes: [out, in]`` (on their device, then move the packed words)."""
        return cls(pack_weight(codes, bits).cpu(), codes.shape[1], bits, params, bias, gguf_type, expert_of)


def expert_groups(records: dict[str, QuantizedLinear]) -> dict[str, list[QuantizedLinear]]:
    """``{fused parameter: its experts' records in expert order}`` (all experts present)."""
    groups: dict[str, dict[int, QuantizedLinear]] = {}
    for name, q in records.items():
        if q.expert_of is not None:
            groups.setdefault(q.expert_of, {})[int(name.rsplit(".", 1)[1])] = q
    out = {}
    for param, by_index in groups.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{param}: experts {sorted(by_index)} are not 0..{len(by_index) - 1}")
        out[param] = [by_index[e] for e in range(len(by_index))]
    return out


def quantization_config(
    spec: QuantSpec, zero_point: str, act_order: bool, records: dict[str, QuantizedLinear],
    gguf_type: str | None = None, gguf_mix: str | None = None,
) -> dict:
    """``bits``/``group_size`` are the run's; a GGUF run also lists every linear's own
    type in ``gguf_types`` (overrides and row-length fallbacks make them differ), and a
    run quantized for a llama.cpp mix (``--gguf Q4_K_M``) names it in ``gguf_mix``, so
    that the checkpoint alone tells the export which embedding/output types to write."""
    qc = {
        "quant_method": "neuqi",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "zero_point": zero_point,
        "act_order": act_order,
        "format_version": FORMAT_VERSION,
        "modules": [n for n, q in records.items() if q.expert_of is None],
    }
    if experts := expert_groups(records):
        qc["experts"] = list(experts)  # fused 3-D expert weights, stored stacked
    if gguf_type is not None:
        qc["gguf_type"] = gguf_type
        qc["gguf_types"] = {n: q.gguf_type or gguf_type for n, q in records.items()}
        if gguf_mix is not None:
            qc["gguf_mix"] = gguf_mix
    return qc


def packed_tensors(name: str, q: QuantizedLinear, spec: QuantSpec, zero_point: str) -> dict[str, Tensor]:
    bits = GGUF_TYPES[q.gguf_type].bits if q.gguf_type else spec.bits
    if q.bits != bits:
        raise ValueError(f"{name} holds {q.bits}-bit codes, its type is {bits}-bit")
    out = {
        f"{name}.qweight": q.qweight,
        f"{name}.scales": q.params.scale.t().contiguous().to(torch.float16),
    }
    zeros = q.params.zero.t().contiguous()
    if zero_point == "offset":
        # GGUF block types: ŵ = s·q + m exactly as llama.cpp decodes it; float32
        # holds every stored step and offset without rounding.
        if q.params.offset is None:
            raise ValueError(f"{name} has no offsets: not quantized for a GGUF type")
        out[f"{name}.scales"] = q.params.scale.t().contiguous().float()
        out[f"{name}.offsets"] = q.params.offset.t().contiguous().float()
    elif zero_point == "float":
        out[f"{name}.zeros"] = zeros.to(torch.float16)
    else:
        out[f"{name}.qzeros"] = pack_zeros(zeros, spec.bits)
    if q.bias is not None:
        out[f"{name}.bias"] = q.bias.detach()
    return out


def packed_state(records: dict[str, QuantizedLinear], spec: QuantSpec, zero_point: str) -> dict[str, Tensor]:
    """Every packed tensor of the quantized modules, named as the loaded model holds them
    (experts stacked ``[E, ...]`` under their fused parameter's name)."""
    tensors: dict[str, Tensor] = {}
    for name, q in records.items():
        if q.expert_of is None:
            tensors.update(packed_tensors(name, q, spec, zero_point))
    for param, group in expert_groups(records).items():
        packed = [packed_tensors(param, q, spec, zero_point) for q in group]
        tensors.update({k: torch.stack([p[k] for p in packed]) for k in packed[0]})
    return tensors


def write_checkpoint(
    model: nn.Module,
    quantized: dict[str, QuantizedLinear],
    spec: QuantSpec,
    zero_point: str,
    act_order: bool,
    folder: Path,
    tokenizer=None,
    run_info: dict | None = None,
    state: dict[str, Tensor] | None = None,
    gguf_type: str | None = None,
    gguf_mix: str | None = None,
) -> None:
    """Write the checkpoint files into an existing folder (the pipeline's temporary
    run directory, renamed into place once complete).

    ``state`` replaces ``model.state_dict()`` for the non-quantized tensors (the
    layer-by-layer path keeps them aside while the model itself stays empty).
    """
    tensors = packed_state(quantized, spec, zero_point)
    skip = {f"{n}.{k}" for n in quantized for k in ("weight", "bias")} | set(expert_groups(quantized))
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, value in (model.state_dict() if state is None else state).items():
        if key in skip or (tied and key == "lm_head.weight"):
            continue
        tensors[key] = value.detach().contiguous()
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(spec, zero_point, act_order, quantized, gguf_type,
                                                   gguf_mix)
    _save_sharded(tensors, folder)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if run_info is not None:
        (folder / "neuqi_run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")


def _save_sharded(tensors: dict[str, Tensor], folder: Path) -> None:
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= SHARD_BYTES:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        b = t.numel() * t.element_size()
        if size + b > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += b
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_state(folder: Path) -> dict[str, Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, with clear errors."""
    files = [folder / "model.safetensors"]
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text())
        files = [folder / f for f in sorted(set(index["weight_map"].values()))]
    state: dict[str, Tensor] = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"checkpoint file {f} is missing (incomplete copy?)")
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"checkpoint file {f} is corrupt or truncated: {exc}") from None
    return state


def load_quantized(folder: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Rebuild a model with ``QuantLinear`` modules from a native neuqi checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} is not a neuqi checkpoint: config.json is missing")
    raw = json.loads(cfg_path.read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "neuqi":
        raise ValueError(f"{folder} is not a neuqi checkpoint (quant_method={qc.get('quant_method')!r})")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{folder} uses neuqi format {qc['format_version']}; this neuqi reads up to "
            f"{FORMAT_VERSION}: upgrade neuqi"
        )
    raw.pop("quantization_config")
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "model_type"},
                                  model_type=raw["model_type"])
    from accelerate import init_empty_weights

    # Parameters on the meta device (no memory, no random init); buffers such as
    # rotary inverse frequencies stay real because they are not in the checkpoint.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        replace_linears(model, qc["modules"], qc, dtype)
        replace_experts(model, qc.get("experts", []), qc, dtype)
    state = read_state(folder)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = set(shapes)
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match its config: missing {missing[:5]}"
            f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if shapes[k] != tuple(v.shape):
            raise ValueError(f"tensor {k} has shape {tuple(v.shape)}, expected {shapes[k]}")
        if v.is_floating_point() and k.rsplit(".", 1)[-1] not in ("scales", "zeros", "offsets"):
            state[k] = v.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.quantization_config = qc
    return model.to(device).eval()
