"""Mixture-of-experts layers: every expert is calibrated on the tokens routed to it.

After the layer's attention is quantized, the calibration batches run up to the
experts module; its input ``x: [T, hidden]`` and the router's choice ``top: [T, k]``
(full-precision router, on the partly quantized layer's inputs) are kept. Then one
expert at a time — so memory holds one ``H``, whatever the number of experts:

* ``gate_up[e]: [2·I, hidden]`` gets ``H = mean x xᵀ`` over the tokens routed to ``e``;
* ``down[e]: [hidden, I]`` gets ``H`` over ``act(gate·x) ⊙ up·x`` of those tokens,
  computed with the already quantized ``gate_up[e]`` (GPTQ's sequential order).

An expert routed fewer than ``moe_min_tokens`` tokens would get an ``H`` of rank
below that count, fitted to a handful of tokens: it is calibrated on every token of
the layer instead (its stats say ``h_source: "layer"``), the choice llm-compressor
makes for all experts. The router (``gate``) stays full precision, as in every peer.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuqi.formats.checkpoint import QuantizedLinear
from neuqi.models.adapters import Experts
from neuqi.pipeline.config import QuantConfig
from neuqi.pipeline.sequential import Batch, HessianAccumulator, _StopForward, quantize_weight


@torch.no_grad()
def expert_inputs(layer: nn.Module, experts: nn.Module, batches: list[Batch]) -> tuple[Tensor, Tensor]:
    """``(x: [T, hidden], top: [T, k])`` over all batches: what the experts module
    receives and which experts the router picked for each token."""
    xs: list[Tensor] = []
    tops: list[Tensor] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        top = args[1] if len(args) > 1 else kwargs["top_k_index"]
        xs.append(hidden.reshape(-1, hidden.shape[-1]))
        tops.append(top.reshape(xs[-1].shape[0], -1))
        raise _StopForward

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            with contextlib.suppress(_StopForward):
                layer(b.hidden, **b.kwargs)
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(tops)


def _hessian(x: Tensor) -> Tensor:
    acc = HessianAccumulator(x.shape[-1], x.device)
    acc.add(x)
    return acc.mean()


@torch.no_grad()
def quantize_experts(
    layer: nn.Module, experts: nn.Module, layout: Experts, batches: list[Batch], opts: QuantConfig,
    prefix: str,
) -> tuple[dict[str, QuantizedLinear], list[dict]]:
    """Quantize every expert of ``experts`` in place; records are named
    ``<prefix>.<param>.<expert>`` (see ``QuantizedLinear.expert_of``)."""
    if opts.gguf is not None:
        raise ValueError(f"{prefix}: --gguf is not available for mixture-of-experts layers yet")
    x, top = expert_inputs(layer, experts, batches)
    gate_up = getattr(experts, layout.gate_up).data  # [E, 2·I, hidden]
    down = getattr(experts, layout.down).data  # [E, hidden, I]
    counts = torch.stack([(top == e).any(-1).sum() for e in range(gate_up.shape[0])]).tolist()
    records: dict[str, QuantizedLinear] = {}
    stats: list[dict] = []
    for e, n in enumerate(counts):
        routed = n >= opts.moe_min_tokens
        xe = x[(top == e).any(-1)] if routed else x
        source = {"tokens": n, "h_source": "routed" if routed else "layer"}
        for param, inputs in ((layout.gate_up, xe), (layout.down, None)):
            weight = gate_up[e] if param == layout.gate_up else down[e]
            if inputs is None:  # the down projection's inputs, through the quantized gate_up[e]
                gate, up = F.linear(xe, gate_up[e].to(xe.dtype)).chunk(2, dim=-1)
                inputs = experts.act_fn(gate) * up
            name = f"{prefix}.{param}.{e}"
            record, st = quantize_weight(weight, None, _hessian(inputs), opts, name,
                                         expert_of=f"{prefix}.{param}")
            records[name] = record
            st.update(name=name, shape=list(weight.shape), **source)
            stats.append(st)
    return records, stats
