"""compressed-tensors ``pack-quantized`` (what llm-compressor writes and vLLM serves,
2/3/4/8-bit, asymmetric, group or channel strategy).

The packing is the library's own (``pack_to_int32``), so the layout always matches the
pinned ``compressed-tensors`` release: signed codes ``q − 2^(b−1)`` packed densely along
the input dim, zero-points shifted the same way and packed along the output dim.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from neuqi.formats.export.source import ExportSource, require_int_zero, require_whole_groups

FORMAT = "compressed-tensors"


def _library():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
        )
    except ImportError as exc:
        raise RuntimeError(
            "the compressed-tensors export needs the compressed-tensors package: "
            "pip install 'neuqi[export]'"
        ) from exc
    return pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def quantization_config(src: ExportSource) -> dict:
    _, QuantizationArgs, QuantizationConfig, QuantizationScheme = _library()
    channel = src.group_size == -1
    weights = QuantizationArgs(
        num_bits=src.bits, type="int", symmetric=False,
        strategy="channel" if channel else "group",
        group_size=None if channel else src.group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    # The pipeline quantizes every decoder linear and expert; the LM head and MoE routers
    # stay in full precision (an engine would otherwise quantize the router's linear).
    ignore = ["lm_head"]
    if src.moe:
        from neuqi.models.adapters import adapter_for

        ignore.append(f"re:.*{adapter_for(src.config['model_type']).experts.hub_router}$")
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                             quantization_status="compressed", ignore=ignore)
    return cfg.model_dump()


def write(src: ExportSource, out: Path, dtype: torch.dtype) -> None:
    require_int_zero(src, FORMAT)
    require_whole_groups(src, FORMAT)
    pack_to_int32, *_ = _library()
    offset = 1 << (src.bits - 1)
    tensors = src.dense_in(dtype)
    for name, lin in src.linears.items():
        signed = (lin.codes.to(torch.int16) - offset).to(torch.int8)
        zp = (lin.zero.round().to(torch.int16) - offset).to(torch.int8)
        tensors[f"{name}.weight_packed"] = pack_to_int32(signed, src.bits)
        tensors[f"{name}.weight_scale"] = lin.scale.to(dtype)
        tensors[f"{name}.weight_zero_point"] = pack_to_int32(zp, src.bits, packed_dim=0)
        tensors[f"{name}.weight_shape"] = torch.tensor(lin.shape, dtype=torch.int64)
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.to(dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    cfg = dict(src.config)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["quantization_config"] = quantization_config(src)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    src.copy_side_files(out)
