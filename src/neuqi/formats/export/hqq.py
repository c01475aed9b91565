"""HQQ layout: float zero-points as they are (``ŵ = (W_q − zero) · scale``).

HQQ groups a weight row-major into ``[out·in/g, g]`` rows (``axis=1``), one scale and
one zero per row, which is exactly our per-(output, group) parameterisation.  We build
each ``HQQLinear`` from our codes with HQQ's own bit packing and let HQQ's serializer
write the checkpoint (``config.json`` + ``qmodel.pt``) that
``hqq.models.hf.base.AutoHQQHFModel.from_quantized`` loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from neuqi.formats.export.source import ExportSource, LinearCodes, refuse_moe, require_whole_groups

FORMAT = "hqq"


def _library():
    try:
        from hqq.core.quantize import HQQLinear, Quantizer
        from hqq.models.hf.base import AutoHQQHFModel
    except ImportError as exc:
        raise RuntimeError("the hqq export needs the hqq package: pip install 'neuqi[export]'") from exc
    return HQQLinear, Quantizer, AutoHQQHFModel


def hqq_state(lin: LinearCodes, bits: int, dtype: torch.dtype) -> dict:
    """The (unencoded) ``HQQLinear`` state dict for one of our quantized linears."""
    _, Quantizer, _ = _library()
    out_f, in_f = lin.shape
    g = lin.group_size
    packing = Quantizer.bit_to_packing[bits]
    rows = lin.codes.reshape(-1, g)  # row-major groups: row o·G + j is (output o, group j)
    state = {
        "W_q": Quantizer.pack[packing](rows.to(torch.uint8 if bits != 3 else torch.int32)),
        "nbits": bits,
        "group_size": g,
        "shape": torch.Size([out_f, in_f]),
        "scale": lin.scale.reshape(-1, 1).to(torch.float16),
        "zero": lin.zero.reshape(-1, 1).to(torch.float16),
        "axis": 1,
        "packing": packing,
        "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
        "view_as_float": False,
        "channel_wise": True,
        "optimize": False,
        "round_zero": False,
        "compute_dtype": dtype,
        "offload_meta": False,
        "stores_quant_config": True,
        "quant_scale": False,
        "quant_zero": False,
    }
    if lin.bias is not None:
        state["bias"] = lin.bias.to(dtype)
    return state


def write(src: ExportSource, out: Path, dtype: torch.dtype) -> None:
    refuse_moe(src, FORMAT)
    if src.bits not in (2, 3, 4, 8):
        raise ValueError(f"HQQ packs 2/3/4/8-bit codes, not {src.bits}-bit")
    require_whole_groups(src, FORMAT)
    per_byte = {2: 4, 4: 2}.get(src.bits, 1)  # HQQ packs whole slices of rows into a byte
    for name, lin in src.linears.items():
        if (lin.shape[0] * lin.shape[1] // lin.group_size) % per_byte:
            raise ValueError(f"HQQ {src.bits}-bit packing needs the group count of {name} to be a "
                             f"multiple of {per_byte}")
    HQQLinear, _, AutoHQQHFModel = _library()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in src.config.items() if k != "model_type"}
    config = AutoConfig.for_model(src.config["model_type"], **cfg)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, lin in src.linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(getattr(parent, child), nn.Linear):
            raise ValueError(f"{name} is not a linear layer in the {src.config['model_type']} model")
        hl = HQQLinear(None, None, compute_dtype=dtype, device="cpu")
        hl.load_state_dict(hqq_state(lin, src.bits, dtype))
        setattr(parent, child, hl)
    model.load_state_dict(src.dense_in(dtype), strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    AutoHQQHFModel.save_quantized(model, str(out))
    src.copy_side_files(out)
