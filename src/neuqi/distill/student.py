"""Turn a loaded quantized model into a student: integer codes frozen, scales /
zero-points / norms / biases trainable; and back into checkpoint records.

A GGUF run trains only what its file stores as floats, so that rounding them to fp16
gives a file of exactly its type: each block's step (and offset, where the type is
asymmetric) for the block-32 types, each super-block's ``d`` (and ``dmin``) for the
k-quants, whose integer sub-block steps and mins stay as the search chose them unless
the caller trains them too (``train_ints``: rounded straight-through, kept in the type's
range, so the file still stores integers)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuqi.formats.checkpoint import QuantizedLinear
from neuqi.formats.qlinear import QuantLinear, _dense
from neuqi.quant.gguf_types import _fp16, _fp16_step, gguf_type
from neuqi.quant.grid import QuantParams
from neuqi.quant.kquants import kquant_fields, scale_levels

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

    def integers(self) -> tuple[Tensor, Tensor]:
        """The sub-block integers ``(k, m)`` as the file stores them, each ``[n_groups,
        out]``: trained ones rounded and clamped into the type's range, with the gradient
        passed straight through the rounding."""
        if not self.train_ints:
            return self.k, self.m
        return _straight_round(self.k, 1.0, self.k_hi), _straight_round(self.m, 0.0, self.m_hi)

    def factors(self) -> tuple[Tensor, Tensor | None]:
        """``(d, dmin)`` per super-block (``dmin`` None for a symmetric type)."""
        return self.step / self.kbar, (self.min_step / self.mbar) if self.asymmetric else None

    def group_params(self) -> tuple[Tensor, Tensor]:
        """Per-group ``(scale, offset)``, each ``[n_groups, out]``."""
        subs = self.k.shape[0] // self.step.shape[0]
        d, dmin = self.factors()
        k, m = self.integers()
        scale = d.repeat_interleave(subs, 0) * k
        if dmin is not None:
            return scale, -dmin.repeat_interleave(subs, 0) * m
        return scale, -scale * self.z

    def dequantize(self) -> Tensor:
        scale, offset = self.group_params()
        return _dense(self.codes(), scale, scale, offset, self.group_size)

    def zero_values(self) -> Tensor:
        scale, offset = self.group_params()
        return -offset / scale

    @torch.no_grad()
    def clamp_step(self) -> None:
        """Keep the step positive and trained integers within half a unit of their range
        (further out, a step of the optimizer could not bring them back)."""
        self.step.clamp_(min=MIN_SCALE)
        if self.train_ints:
            self.k.copy_(torch.minimum(self.k.clamp_min(0.5), self.k_hi + 0.5))
            self.m.copy_(torch.minimum(self.m.clamp_min(-0.5), self.m_hi + 0.5))

    @torch.no_grad()
    def round_to_type(self) -> None:
        """The trained factors as the file stores them (fp16; ``d > 0``, k-quant ``dmin ≥ 0``).
        ``kbar``/``mbar`` become 1 so that ``step``/``min_step`` hold exactly ``d``/``dmin``."""
        if self.train_ints:
            k, m = self.integers()
            self.k.copy_(k)
            self.m.copy_(m)
        d, dmin = self.factors()
        self.step.copy_(_fp16_step(d))
        self.kbar.fill_(1.0)
        if dmin is not None:  # a k-quant stores the min as dmin·m with dmin, m ≥ 0
            self.min_step.copy_(_fp16(dmin.clamp_min(0) if self.kquant else dmin))
            self.mbar.fill_(1.0)


def _straight_round(x: Tensor, lo: float, hi: Tensor) -> Tensor:
    """``x`` rounded and clamped to ``[lo, hi]`` forward, the identity backward."""
    return x + (torch.minimum(torch.round(x).clamp_min(lo), hi) - x).detach()


def _super_mean(x: Tensor, subs: int) -> Tensor:
    """``x: [n_groups, out]`` → per super-block mean ``[n_super, out]``, at least 1."""
    return x.reshape(-1, subs, x.shape[-1]).mean(1).clamp_min(1.0)


def _to_gguf_student(mod: QuantLinear, train_ints: bool = False) -> list[nn.Parameter]:
    """Re-type ``mod`` in place as a :class:`GGUFStudentLinear`; its trainable factors
    (and, with ``train_ints`` on a k-quant, its sub-block integers: see :func:`integer_parameters`)."""
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
    mod.train_ints = train_ints and t.is_kquant
    ints = ("k", "m") if mod.train_ints else ()
    for name, value in (("k", k), ("m", m), ("z", z), ("kbar", kbar), ("mbar", mbar)):
        if name not in ints:
            mod.register_buffer(name, value.contiguous().float())
    mod.step = nn.Parameter((d * kbar).contiguous().float())
    trained = [mod.step]
    if t.asymmetric:
        mod.min_step = nn.Parameter((dmin * mbar).contiguous().float())
        trained.append(mod.min_step)
    if mod.train_ints:  # the largest integer each sub-block may take (symmetric: by its zero)
        k_c, k_c1 = scale_levels(t)
        flip = z == t.centre - 1
        mod.register_buffer("k_hi", torch.where(flip, float(k_c1), float(k_c)).contiguous())
        mod.register_buffer("m_hi", torch.full_like(m, float(k_c) if t.asymmetric else 0.0).contiguous())
        mod.k = nn.Parameter(k.contiguous().float())
        mod.m = nn.Parameter(m.contiguous().float())
        trained += [mod.k, mod.m] if t.asymmetric else [mod.k]
    return trained


def integer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trained sub-block integers of every k-quant student (``train_ints``): they take
    their own learning rate in units of one integer step, not the factors' relative one."""
    out: list[nn.Parameter] = []
    for mod in quant_linears(model).values():
        if isinstance(mod, GGUFStudentLinear) and mod.train_ints:
            out += [mod.k, mod.m] if mod.asymmetric else [mod.k]
    return out


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def make_student(model: nn.Module, free_zero: bool, train_ints: bool = False) -> list[nn.Parameter]:
    """Freeze everything, then make the trainable set trainable; returns it.

    Scales become float32 parameters (the checkpoint's fp16 values, exactly). Float
    zero-points train; integer ones stay fixed unless ``free_zero`` (then they train
    as floats and the run becomes float-zero).  ``train_ints``: k-quant GGUF linears
    train their sub-block integers too (:func:`integer_parameters`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for mod in quant_linears(model).values():
        mod._codes = mod.codes().to(torch.int16)  # unpack once; autograd never touches codes
        mod.cache, mod._dense = False, None
        if mod.zero_point == "offset":
            trainable += _to_gguf_student(mod, train_ints)
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
