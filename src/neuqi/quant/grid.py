"""The uniform quantizer shared by every algorithm: one convention, one place.

For ``w: [out, in]`` with ``scale, zero: [out, n_groups]``::

    q = clamp(round(w / s + z), 0, maxq)        ŵ = s · (q − z)

``z`` is a float for NeUQI and a whole number for min-max / NeUQI_int.  A group
size that does not divide ``in`` leaves a partial last group (as GPTQ does).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QuantSpec:
    """Bit width and grouping of a uniform asymmetric quantizer.

    ``group_size=-1`` means one group per output row (channel-wise).
    """

    bits: int
    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or (
            self.group_size <= 0 and self.group_size != -1
        ):
            raise ValueError(
                f"group_size must be a positive integer or -1 (channel-wise), "
                f"got {self.group_size!r}"
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_len(self, in_features: int) -> int:
        """Columns per group (the last group may be shorter)."""
        return in_features if self.group_size == -1 else min(self.group_size, in_features)

    def n_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_len(in_features))

    def group_index(self, in_features: int, device: torch.device | str | None = None) -> Tensor:
        """``g_idx: [in]`` — the group of every input column, in storage order."""
        return torch.arange(in_features, device=device) // self.group_len(in_features)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantParams:
    """Per (row, group) parameters. ``scale, zero: [out, n_groups]``.

    ``offset`` (same shape) is set for parameters in *offset form* (GGUF block
    types): then ``ŵ = scale·q + offset`` exactly, as the file's dequantizer
    computes it, and ``zero = −offset/scale`` serves only the solvers' rounding.
    """

    scale: Tensor
    zero: Tensor
    offset: Tensor | None = None

    def to(self, device: torch.device | str) -> QuantParams:
        off = None if self.offset is None else self.offset.to(device)
        return QuantParams(self.scale.to(device), self.zero.to(device), off)

    def expand(self, spec: QuantSpec, in_features: int) -> tuple[Tensor, Tensor]:
        """Scale and zero broadcast to every column: two ``[out, in]`` tensors."""
        g_idx = spec.group_index(in_features, self.scale.device)
        return self.scale[:, g_idx], self.zero[:, g_idx]


def check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} holds {bad} NaN/inf value(s); quantization needs finite inputs "
            f"(check the checkpoint or the calibration activations)"
        )


def check_weight(w: Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    check_finite("weight", w)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Elementwise codes for broadcastable ``scale``/``zero`` (float result)."""
    return torch.clamp(torch.round(w / scale + zero), 0, maxq)


def quantize(w: Tensor, params: QuantParams, spec: QuantSpec) -> Tensor:
    """Integer codes ``[out, in]`` (uint8) of ``w`` under ``params``."""
    check_weight(w)
    s, z = params.expand(spec, w.shape[1])
    return quantize_codes(w.float(), s.float(), z.float(), spec.maxq).to(torch.uint8)


def dequantize(codes: Tensor, params: QuantParams, spec: QuantSpec) -> Tensor:
    """Float ``[out, in]`` weights ``s · (q − z)`` (or ``s·q + offset``) for integer ``codes``."""
    s, z = params.expand(spec, codes.shape[1])
    if params.offset is not None:
        m = params.offset[:, spec.group_index(codes.shape[1], params.offset.device)]
        return s.float() * codes.float() + m.float()
    return s.float() * (codes.float() - z.float())


def fake_quantize(w: Tensor, params: QuantParams, spec: QuantSpec) -> Tensor:
    """``dequantize(quantize(w))`` — round-to-nearest with fixed parameters."""
    return dequantize(quantize(w, params, spec), params, spec)


def weighted_error(w: Tensor, w_hat: Tensor, h_diag: Tensor | None = None) -> Tensor:
    """Per-row ``Σ_j h_j (w_j − ŵ_j)²``: the objective NeUQI minimises. ``[out]``."""
    err = (w.float() - w_hat.float()) ** 2
    if h_diag is not None:
        err = err * h_diag.float()
    return err.sum(dim=1)


def group_weighted_error(
    w: Tensor, w_hat: Tensor, spec: QuantSpec, h_diag: Tensor | None = None
) -> Tensor:
    """Per (row, group) weighted squared error ``[out, n_groups]``."""
    err = (w.float() - w_hat.float()) ** 2
    if h_diag is not None:
        err = err * h_diag.float()
    out, n_in = w.shape
    g_idx = spec.group_index(n_in, w.device)
    res = torch.zeros(out, spec.n_groups(n_in), device=w.device, dtype=err.dtype)
    return res.index_add_(1, g_idx, err)
