"""``QuantLinear``: a linear layer that keeps packed codes and de-quantizes on the fly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuqi.formats.packing import unpack_weight, unpack_zeros

ZERO_POINTS = ("float", "int", "offset")


class QuantLinear(nn.Module):
    """Buffers (DESIGN.md "Checkpoint format"):

    * ``qweight: [ceil(in/32)·bits, out]`` int32 — codes packed along the input dim;
    * ``scales: [n_groups, out]`` fp16;
    * ``zeros: [n_groups, out]`` fp16 (float zero-point) or
      ``qzeros: [n_groups, ceil(out/32)·bits]`` int32 (integer zero-point), or
      ``offsets: [n_groups, out]`` float32 with float32 ``scales`` (GGUF block types:
      ``ŵ = scale·q + offset``, exactly as llama.cpp decodes the block);
    * ``bias: [out]`` when the original layer had one.

    ``ŵ = scale · (q − zero)`` per (row, group).  With ``cache=True`` the dense weight
    is kept after the first call (fast, uses FP memory).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        zero_point: str = "float",
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if zero_point not in ZERO_POINTS:
            raise ValueError(f"zero_point must be one of {ZERO_POINTS}, got {zero_point!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_point = bits, group_size, zero_point
        g = in_features if group_size == -1 else min(group_size, in_features)
        self.n_groups = math.ceil(in_features / g)
        words = math.ceil(in_features / 32) * bits
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(words, out_features, dtype=torch.int32, **kw))
        sdtype = torch.float32 if zero_point == "offset" else torch.float16
        self.register_buffer("scales", torch.ones(self.n_groups, out_features, dtype=sdtype, **kw))
        if zero_point == "offset":
            self.register_buffer("offsets", torch.zeros(self.n_groups, out_features, dtype=sdtype, **kw))
        elif zero_point == "float":
            self.register_buffer("zeros", torch.zeros(self.n_groups, out_features, dtype=torch.float16, **kw))
        else:
            zw = math.ceil(out_features / 32) * bits
            self.register_buffer("qzeros", torch.zeros(self.n_groups, zw, dtype=torch.int32, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw)) if bias else None
        self.cache = False
        self._dense: Tensor | None = None
        self._codes: Tensor | None = None  # unpacked codes, kept while training (distillation)

    def zero_values(self) -> Tensor:
        """Zero-points as floats ``[n_groups, out]`` (``−offset/scale`` in offset form)."""
        if self.zero_point == "offset":
            return -self.offsets.float() / self.scales.float()
        if self.zero_point == "float":
            return self.zeros.float()
        return unpack_zeros(self.qzeros, self.bits, self.out_features).float()

    def codes(self) -> Tensor:
        if self._codes is not None:
            return self._codes
        return unpack_weight(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> Tensor:
        """The dense weight ``[out, in]`` in float32."""
        g_idx = torch.arange(self.in_features, device=self.qweight.device) // (
            self.in_features if self.group_size == -1 else min(self.group_size, self.in_features)
        )
        s = self.scales.float().t()[:, g_idx]
        if self.zero_point == "offset":
            return s * self.codes().float() + self.offsets.float().t()[:, g_idx]
        z = self.zero_values().t()[:, g_idx]
        return s * (self.codes().float() - z)

    def forward(self, x: Tensor) -> Tensor:
        w = self._dense
        if w is None:
            w = self.dequantize().to(x.dtype)
            if self.cache:
                self._dense = w
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, zero_point={self.zero_point}"
        )


def replace_linears(model: nn.Module, names: list[str], qc: dict, dtype: torch.dtype) -> None:
    """Swap the named ``nn.Linear`` modules of ``model`` for empty ``QuantLinear``s."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"checkpoint lists {name} as quantized but it is {type(lin).__name__}")
        bits, group_size = qc["bits"], qc["group_size"]
        if ty := qc.get("gguf_types", {}).get(name):  # GGUF runs: each linear its own type
            from neuqi.quant.gguf_types import gguf_type

            t = gguf_type(ty)
            bits, group_size = t.bits, t.block
        ql = QuantLinear(
            lin.in_features,
            lin.out_features,
            bits,
            group_size,
            qc["zero_point"],
            bias=lin.bias is not None,
            dtype=dtype,
            device=lin.weight.device,
        )
        setattr(parent, child, ql)
