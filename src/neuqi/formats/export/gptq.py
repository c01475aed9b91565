"""GPTQ layout (read by GPTQModel, transformers and vLLM).

``qweight [in/32·bits, out]`` packs codes along the input dim in the same bit stream as
our native format; ``qzeros [n_groups, out/32·bits]`` packs zero-points along the output
dim; ``scales [n_groups, out]`` fp16; ``g_idx [in]`` maps each input to its group.
``checkpoint_format = "gptq_v2"`` stores true zero-points; the legacy ``gptq`` (v1)
stores ``zero − 1`` and so cannot hold a zero-point of 0 — we write it only on request
and only when no group has one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from neuqi.formats.export.source import ExportSource, refuse_moe, require_int_zero, require_whole_groups
from neuqi.formats.packing import pack_weight, pack_zeros

FORMAT = "gptq"
CHECKPOINT_FORMATS = ("gptq_v2", "gptq")


def quantization_config(src: ExportSource, checkpoint_format: str) -> dict:
    return {
        "quant_method": "gptq",
        "bits": src.bits,
        "group_size": src.group_size,
        "desc_act": False,  # our act-order only changes the solve order; groups stay contiguous
        "sym": False,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["neuqi"], "act_order_solve": src.act_order},
    }


def write(src: ExportSource, out: Path, dtype: torch.dtype, checkpoint_format: str = "gptq_v2") -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    refuse_moe(src, FORMAT)
    require_int_zero(src, FORMAT)
    require_whole_groups(src, FORMAT)
    v1 = checkpoint_format == "gptq"
    tensors = src.dense_in(dtype)
    for name, lin in src.linears.items():
        out_f, in_f = lin.shape
        if in_f % 32 or out_f % 32:
            raise ValueError(f"GPTQ packing needs in/out features divisible by 32; {name} is {out_f}×{in_f}")
        zeros = lin.zero.round().to(torch.int64)
        if v1:
            if int(zeros.min()) < 1:
                raise ValueError(
                    f"checkpoint_format 'gptq' (v1) stores zero − 1 and {name} has zero-points of 0: "
                    "it would be lossy; use the default gptq_v2"
                )
            zeros = zeros - 1
        tensors[f"{name}.qweight"] = pack_weight(lin.codes, src.bits)
        tensors[f"{name}.qzeros"] = pack_zeros(zeros.t(), src.bits)
        tensors[f"{name}.scales"] = lin.scale.t().contiguous().to(torch.float16)
        tensors[f"{name}.g_idx"] = (torch.arange(in_f) // lin.group_size).to(torch.int32)
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.to(torch.float16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    qcfg = quantization_config(src, checkpoint_format)
    cfg = dict(src.config)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    (out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    src.copy_side_files(out)
