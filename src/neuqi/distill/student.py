"""Turn a loaded quantized model into a student: integer codes frozen, scales /
zero-points / norms / biases trainable; and back into checkpoint records."""

from __future__ import annotations

import torch
from torch import nn

from neuqi.formats.checkpoint import QuantizedLinear
from neuqi.formats.qlinear import QuantLinear
from neuqi.quant.grid import QuantParams

MIN_SCALE = 1e-8


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def make_student(model: nn.Module, free_zero: bool) -> list[nn.Parameter]:
    """Freeze everything, then make the trainable set trainable; returns it.

    Scales become float32 parameters (the checkpoint's fp16 values, exactly). Float
    zero-points train; integer ones stay fixed unless ``free_zero`` (then they train
    as floats and the run becomes float-zero)."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for mod in quant_linears(model).values():
        mod._codes = mod.codes().to(torch.int16)  # unpack once; autograd never touches codes
        mod.cache, mod._dense = False, None
        scales = mod._buffers.pop("scales").float()
        mod.scales = nn.Parameter(scales)
        trainable.append(mod.scales)
        if mod.zero_point == "float" or free_zero:
            zeros = mod.zero_values()
            mod._buffers.pop("zeros" if mod.zero_point == "float" else "qzeros")
            mod.zero_point = "float"
            mod.zeros = nn.Parameter(zeros.float())
            trainable.append(mod.zeros)
        if mod.bias is not None:
            mod.bias.requires_grad_(True)
            trainable.append(mod.bias)
    for name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower() or name.endswith("norm"):
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
                trainable.append(p)
    return trainable


@torch.no_grad()
def keep_scales_positive(model: nn.Module) -> None:
    for mod in quant_linears(model).values():
        mod.scales.clamp_(min=MIN_SCALE)


def records(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Checkpoint records (packed codes, params, bias) of the trained student."""
    out = {}
    for name, mod in quant_linears(model).items():
        scale = mod.scales.detach().float().t().contiguous().cpu()  # [n_groups, out] → [out, n_groups]
        zero = mod.zero_values().detach().float().t().contiguous().cpu()
        out[name] = QuantizedLinear(  # codes are frozen: the packed buffer is still theirs
            mod.qweight.detach().cpu(),
            mod.in_features,
            mod.bits,
            QuantParams(scale, zero),
            None if mod.bias is None else mod.bias.detach().cpu(),
        )
    return out
