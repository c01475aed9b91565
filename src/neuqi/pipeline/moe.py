"""Mixture-of-experts layers: every expert is calibrated on the tokens routed to it.

After the layer's attention is quantized, the calibration batches run up to the
experts module; its input ``x: [T, hidden]`` and the router's choice ``top: [T, k]``
(full-precision router, on the partly quantized layer's inputs) are kept. Then one
expert at a time — so memory holds one ``H``, whatever the number of experts:

* ``gate_up[e]: [2·I, hidden]`` gets ``H = mean x xᵀ`` over the tokens routed to ``e``;
* ``down[e]: [hidden, I]`` gets ``H`` over ``act(gate·x) ⊙ up·x`` of those tokens,
  computed with the already quantized ``gate_up[e]`` (GPTQ's sequential order).

An expert routed few tokens would get an ``H`` of low rank, fitted to a handful of
tokens. So the layer's ``H`` (every token through this expert) enters as a prior worth
``M = moe_prior_tokens`` tokens: ``H_e = (n·H_routed + M·H_all) / (n + M)``. An expert
with no tokens gets the layer's ``H`` (what llm-compressor uses for every expert); one
with ``n ≫ M`` its own. ``bench/moe_prior_tokens.py`` measured the choice (real
SmolLM2 inputs and weights, simulated router): routed-only ``H`` is worse at every
count, most at 64–1024 tokens (the rank-deficient regime), and ``M = 4096`` was best.
Its stats record ``tokens`` and ``prior_weight = M / (n + M)``. The router (``gate``)
stays full precision, as in every peer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuqi.formats.checkpoint import QuantizedLinear
from neuqi.memory import release_freed_memory
from neuqi.models.adapters import Experts
from neuqi.pipeline.config import QuantConfig
from neuqi.pipeline.sequential import Batch, HessianAccumulator, forward_until, quantize_weight


@torch.no_grad()
def expert_inputs(layer: nn.Module, experts: nn.Module, batches: list[Batch]) -> tuple[Tensor, Tensor]:
    """``(x: [T, hidden], top: [T, k])`` over all batches: what the experts module
    receives and which experts the router picked for each token."""
    xs: list[Tensor] = []
    tops: list[Tensor] = []

    def record(args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        top = args[1] if len(args) > 1 else kwargs["top_k_index"]
        xs.append(hidden.reshape(-1, hidden.shape[-1]))
        tops.append(top.reshape(xs[-1].shape[0], -1))

    forward_until(layer, experts, batches, record)
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
    prior = opts.moe_prior_tokens
    h_layer = _hessian(x) if prior else None  # one [hidden, hidden], whatever E
    routed = [(top == e).any(-1) for e in range(gate_up.shape[0])]
    counts = torch.stack([r.sum() for r in routed]).tolist()
    records: dict[str, QuantizedLinear] = {}
    stats: list[dict] = []

    def blend(h_routed: Tensor | None, h_all: Tensor | None, n: int) -> Tensor:
        if h_all is None:
            return h_routed
        return h_all if h_routed is None else (n * h_routed + prior * h_all) / (n + prior)

    def act_inputs(e: int, xs: Tensor) -> Tensor:
        """What ``down[e]`` sees: act(gate·x) ⊙ up·x through the quantized gate_up[e]."""
        gate, up = F.linear(xs, gate_up[e].to(xs.dtype)).chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    for e, n in enumerate(counts):
        if n == 0 and not prior:
            raise RuntimeError(f"{prefix}: expert {e} got no calibration tokens and --moe-prior-tokens "
                               "is 0; give it a prior or more calibration text")
        xe = x[routed[e]]
        info = {"tokens": n, "prior_weight": prior / (n + prior) if prior else 0.0}
        h_gate_up = blend(_hessian(xe) if n else None, h_layer, n)
        _quantize_expert(gate_up[e], h_gate_up, f"{prefix}.{layout.gate_up}", e, opts, info, records, stats)
        del h_gate_up
        h_down = blend(_hessian(act_inputs(e, xe)) if n else None,
                       _hessian(act_inputs(e, x)) if prior else None, n)
        _quantize_expert(down[e], h_down, f"{prefix}.{layout.down}", e, opts, info, records, stats)
        del h_down
        # the expert's packed codes now sit between its freed temporaries on the heap;
        # give those pages back, or the heap grows by them with every expert
        release_freed_memory()
    return records, stats


def _quantize_expert(weight: Tensor, H: Tensor, param: str, e: int, opts: QuantConfig, info: dict,
                     records: dict[str, QuantizedLinear], stats: list[dict]) -> None:
    name = f"{param}.{e}"
    record, st = quantize_weight(weight, None, H, opts, name, expert_of=param)
    records[name] = record
    st.update(name=name, shape=list(weight.shape), **info)
    stats.append(st)
