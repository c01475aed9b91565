"""Turn a loaded quantized model into a student: integer codes frozen, scales /
zero-points / norms / biases trainable; and back into checkpoint records.

A GGUF run trains only what its file stores as floats, so that rounding them to fp16
gives a file of exactly its type: each block's step (and offset, where the type is
asymmetric) for the block-32 types, each super-block's ``d`` (and ``dmin``) for the
k-quants, whose integer sub-block steps and mins stay as the search chose them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuqi.formats.checkpoint import QuantizedLinear
from neuqi.formats.qlinear import QuantLinear, _dense
from neuqi.quant.gguf_types import _fp16, _fp16_step, gguf_type
from neuqi.quant.grid import QuantParams
from neuqi.quant.kquants import kquant_fields

MIN_SCALE = 1e-8


class GGUFStudentLinear(QuantLinear):
    """A GGUF linear being distilled: ``scale = d·k``, ``offset = −dmin·m`` per group
    (asymmetric types) or ``−scale·z`` (symmetric: the zero ``c`` or ``c − 1`` fixed).

    The trainable values are relative, so that one learning rate means the same on
    every model and type: ``step = d / d₀`` (1 at the start: an optimizer step moves
    each super-block's ``d`` by about ``lr`` of itself, so every weight by about ``lr``
    of itself) and ``min_step = dmin·m̄ / (d₀·k̄)``, the super-block's mean min in codes
    of its mean sub-block step at the start (an optimizer step shifts it by about
    ``lr`` codes).  ``k̄``, ``m̄``: the super-block's mean integers.  Until 2026-12-07
    the steps trained in weight units (``d·k̄`` times ``2^(bits−4)``) at an absolute
    rate, and ``lr`` 3e-4 broke Qwen2.5-Coder-0.5B at Q4_0 (its steps are smaller than
    SmolLM2's: each optimizer step moved them by several percent).
    ``k``, ``m``, ``z``: ``[n_groups, out]`` frozen (block-32 types: one group per
    super-block, ``k = m = 1``); ``kbar = 1/d₀`` and ``mbar = m̄/(d₀·k̄)`` ``[n_super,
    out]`` turn the trainable values back into ``(d, dmin)``.
    """

    def factors(self) -> tuple[Tensor, Tensor | None]:
        """``(d, dmin)`` per super-block (``dmin`` None for a symmetric type)."""
        return self.step / self.kbar, (self.min_step / self.mbar) if self.asymmetric else None

    def group_params(self) -> tuple[Tensor, Tensor]:
        """Per-group ``(scale, offset)``, each ``[n_groups, out]``."""
        subs = self.k.shape[0] // self.step.shape[0]
        d, dmin = self.factors()
        scale = d.repeat_interleave(subs, 0) * self.k
        if dmin is not None:
            return scale, -dmin.repeat_interleave(subs, 0) * self.m
        return scale, -scale * self.z

    def dequantize(self) -> Tensor:
        scale, offset = self.group_params()
        return _dense(self.codes(), scale, scale, offset, self.group_size)

    def zero_values(self) -> Tensor:
        scale, offset = self.group_params()
        return -offset / scale

    @torch.no_grad()
    def clamp_step(self) -> None:
        self.step.clamp_(min=MIN_SCALE)

    @torch.no_grad()
    def round_to_type(self) -> None:
        """The trained factors as the file stores them (fp16; ``d > 0``, k-quant ``dmin ≥ 0``).
        ``kbar``/``mbar`` become 1 so that ``step``/``min_step`` hold exactly ``d``/``dmin``."""
        d, dmin = self.factors()
        self.step.copy_(_fp16_step(d))
        self.kbar.fill_(1.0)
        if dmin is not None:  # a k-quant stores the min as dmin·m with dmin, m ≥ 0
            self.min_step.copy_(_fp16(dmin.clamp_min(0) if self.kquant else dmin))
            self.mbar.fill_(1.0)


def _super_mean(x: Tensor, subs: int) -> Tensor:
    """``x: [n_groups, out]`` → per super-block mean ``[n_super, out]``, at least 1."""
    return x.reshape(-1, subs, x.shape[-1]).mean(1).clamp_min(1.0)


def _to_gguf_student(mod: QuantLinear) -> list[nn.Parameter]:
    """Re-type ``mod`` in place as a :class:`GGUFStudentLinear`; its trainable factors."""
    t = gguf_type(mod.gguf_type)
    scale = mod._buffers.pop("scales").float()  # [n_groups, out]
    offset = mod._buffers.pop("offsets").float()
    ones = torch.ones_like(scale)
    if t.is_kquant:
        f = kquant_fields(QuantParams(scale.t(), (-offset / scale).t(), offset.t()), t)
        d, dmin, k, m = f.d.t(), f.dmin.t(), f.k.abs().t(), f.m.t()
        z = (t.centre - f.flip.float()).t()
    else:
        d, dmin, k, m = scale, -offset, ones, ones
        z = torch.round(-offset / scale)
    d0 = torch.where(d.abs() > 0, d.abs(), torch.ones_like(d))  # an all-zero block's d is 0
    kbar, mbar = 1.0 / d0, _super_mean(m, t.subs) / (d0 * _super_mean(k, t.subs))
    mod.__class__ = GGUFStudentLinear
    mod.asymmetric, mod.kquant = t.asymmetric, t.is_kquant
    for name, value in (("k", k), ("m", m), ("z", z), ("kbar", kbar), ("mbar", mbar)):
        mod.register_buffer(name, value.contiguous().float())
    mod.step = nn.Parameter((d * kbar).contiguous().float())
    if not t.asymmetric:
        return [mod.step]
    mod.min_step = nn.Parameter((dmin * mbar).contiguous().float())
    return [mod.step, mod.min_step]


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
        if mod.zero_point == "offset":
            trainable += _to_gguf_student(mod)
            if mod.bias is not None:
                mod.bias.requires_grad_(True)
                trainable.append(mod.bias)
            continue
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
        if isinstance(mod, GGUFStudentLinear):
            mod.clamp_step()
        else:
            mod.scales.clamp_(min=MIN_SCALE)


def round_to_types(model: nn.Module) -> None:
    """Round every GGUF student's factors to what its type stores (idempotent)."""
    for mod in quant_linears(model).values():
        if isinstance(mod, GGUFStudentLinear):
            mod.round_to_type()


def records(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Checkpoint records (packed codes, params, bias) of the trained student; a GGUF
    student's factors are rounded to what its type stores first."""
    out = {}
    for name, mod in quant_linears(model).items():
        if isinstance(mod, GGUFStudentLinear):
            mod.round_to_type()
            scale, offset = (x.detach().float().t().contiguous().cpu() for x in mod.group_params())
            out[name] = QuantizedLinear(mod.qweight.detach().cpu(), mod.in_features, mod.bits,
                                        QuantParams(scale, -offset / scale, offset),
                                        None if mod.bias is None else mod.bias.detach().cpu(), mod.gguf_type)
            continue
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
