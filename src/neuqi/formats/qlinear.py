"""``QuantLinear``: a linear layer that keeps packed codes and de-quantizes on the fly."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuqi.formats.packing import unpack_weight, unpack_zeros

ZERO_POINTS = ("float", "int", "offset")


def _dense(codes: Tensor, scales: Tensor, zeros: Tensor, offsets: Tensor | None, group_size: int) -> Tensor:
    """``codes: [out, in]``, ``scales/zeros/offsets: [n_groups, out]`` → float32 ``[out, in]``."""
    n_in = codes.shape[1]
    g_idx = torch.arange(n_in, device=codes.device) // (n_in if group_size == -1 else min(group_size, n_in))
    s = scales.float().t()[:, g_idx]
    if offsets is not None:
        return s * codes.float() + offsets.float().t()[:, g_idx]
    return s * (codes.float() - zeros.float().t()[:, g_idx])


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
        self.gguf_type: str | None = None  # GGUF runs: the llama.cpp type this linear is stored as

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
        offsets = self.offsets if self.zero_point == "offset" else None
        return _dense(self.codes(), self.scales, self.zero_values(), offsets, self.group_size)

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
        ql.gguf_type = ty or None
        setattr(parent, child, ql)


class QuantExperts(nn.Module):
    """One fused 3-D expert weight ``[E, out, in]`` kept packed: the buffers of
    ``QuantLinear`` with a leading expert axis (``qweight: [E, words, out]``,
    ``scales``/``zeros``: ``[E, n_groups, out]`` or ``qzeros: [E, n_groups, zw]``)."""

    def __init__(self, n_experts: int, out_features: int, in_features: int, bits: int, group_size: int,
                 zero_point: str, device: torch.device | str | None = None) -> None:
        super().__init__()
        if zero_point not in ("float", "int"):
            raise ValueError(f"experts take float or int zero-points, not {zero_point!r}")
        self.n_experts, self.out_features, self.in_features = n_experts, out_features, in_features
        self.bits, self.group_size, self.zero_point = bits, group_size, zero_point
        g = in_features if group_size == -1 else min(group_size, in_features)
        n_groups = math.ceil(in_features / g)
        kw = {"device": device}
        words = math.ceil(in_features / 32) * bits
        self.register_buffer("qweight", torch.zeros(n_experts, words, out_features, dtype=torch.int32, **kw))
        f16 = torch.float16
        self.register_buffer("scales", torch.ones(n_experts, n_groups, out_features, dtype=f16, **kw))
        if zero_point == "float":
            self.register_buffer("zeros", torch.zeros(n_experts, n_groups, out_features, dtype=f16, **kw))
        else:
            zw = math.ceil(out_features / 32) * bits
            self.register_buffer("qzeros", torch.zeros(n_experts, n_groups, zw, dtype=torch.int32, **kw))
        self._dense: Tensor | None = None  # set to keep the de-quantized weights (verification)

    def zero_values(self, e: int) -> Tensor:
        """Expert ``e``'s zero-points as floats ``[n_groups, out]``."""
        if self.zero_point == "float":
            return self.zeros[e].float()
        return unpack_zeros(self.qzeros[e], self.bits, self.out_features).float()

    def codes(self, e: int) -> Tensor:
        return unpack_weight(self.qweight[e], self.bits, self.in_features)

    def expert(self, e: int) -> Tensor:
        """Expert ``e``'s dense weight ``[out, in]`` in float32."""
        return _dense(self.codes(e), self.scales[e], self.zero_values(e), None, self.group_size)

    def dequantize(self) -> Tensor:
        """``[E, out, in]`` float32."""
        if self._dense is not None:
            return self._dense
        return torch.stack([self.expert(e) for e in range(self.n_experts)])

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, in={self.in_features}, out={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, zero_point={self.zero_point}")


def _experts_forward(module: nn.Module, *args, **kwargs):
    """The experts module's own forward, on weights de-quantized for this call: the
    model's code (eager loop or grouped matmul) runs unchanged."""
    held = {n: module._modules.pop(n) for n in module._neuqi_packed}
    hidden = args[0] if args else kwargs["hidden_states"]
    try:
        for n, q in held.items():
            object.__setattr__(module, n, q.dequantize().to(hidden.dtype))
        return type(module).forward(module, *args, **kwargs)
    finally:
        for n, q in held.items():
            module.__dict__.pop(n, None)
            module._modules[n] = q


def replace_experts(model: nn.Module, names: list[str], qc: dict, dtype: torch.dtype) -> None:
    """Swap the named fused 3-D expert parameters for empty ``QuantExperts``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        param = parent._parameters.get(child)
        if param is None or param.dim() != 3:
            raise ValueError(f"checkpoint lists {name} as fused experts but the model has no 3-D "
                             f"parameter there")
        if qc.get("gguf_types"):
            raise ValueError(f"{name}: GGUF types are not available for experts")
        n_experts, out_features, in_features = param.shape
        del parent._parameters[child]
        parent.add_module(child, QuantExperts(n_experts, out_features, in_features, qc["bits"],
                                              qc["group_size"], qc["zero_point"], param.device))
        if not hasattr(parent, "_neuqi_packed"):
            parent._neuqi_packed = []
            parent.forward = functools.partial(_experts_forward, parent)
        parent._neuqi_packed.append(child)
