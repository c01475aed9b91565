"""Architecture knowledge as data: where the decoder layers and their linears are.

Each entry lists the linears of a decoder layer in calibration order, grouped by
shared input ({q,k,v} → {o} → {gate,up} → {down}); one H serves a whole group.
Mixture-of-experts layers name their experts module instead of a dense MLP: its
fused 3-D weights hold one matrix per expert, each calibrated on its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Experts:
    """A layer's experts stored as fused 3-D parameters (transformers 5):
    ``gate_up: [E, 2·I, hidden]`` (gate rows, then up rows) and ``down: [E, hidden, I]``;
    an expert computes ``down · (act(gate·x) ⊙ up·x)`` with the module's ``act_fn`` on
    the tokens the router sends it. The router stays full precision."""

    path: str = "mlp.experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    # How the model's original checkpoints (and vLLM) name one expert's matrices:
    # ``<layer>.<hub_path>.<e>.<hub_gate|hub_up|hub_down>``; exports write these names.
    hub_path: str = "mlp.experts"
    hub_gate: str = "gate_proj"
    hub_up: str = "up_proj"
    hub_down: str = "down_proj"
    hub_renames: tuple[tuple[str, str], ...] = ()  # other module paths: (ours, the hub's)
    hub_router: str = "mlp.gate"  # the router, which stays full precision in every export


@dataclass(frozen=True)
class Adapter:
    layers: str
    groups: tuple[tuple[str, ...], ...]
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    lm_head: str = "lm_head"
    experts: Experts | None = None  # MoE layers (a model may mix them with dense ones)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def layer_groups(self, layer: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The groups this layer has: a MoE layer has no dense MLP linears."""
        return tuple(g for g in self.groups if _has(layer, g[0]))

    def layer_experts(self, layer: nn.Module) -> nn.Module | None:
        """The layer's experts module, checked against the layout this adapter knows."""
        if self.experts is None or not _has(layer, self.experts.path):
            return None
        module = layer.get_submodule(self.experts.path)
        e = self.experts
        gu, down = getattr(module, e.gate_up, None), getattr(module, e.down, None)
        ok = (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == down.dim() == 3
              and gu.shape[0] == down.shape[0] and gu.shape[1] == 2 * down.shape[2]
              and gu.shape[2] == down.shape[1] and callable(getattr(module, "act_fn", None))
              and not getattr(module, "has_bias", False) and not getattr(module, "is_transposed", False)
              and getattr(module, "is_concatenated", True))
        if not ok:
            raise ValueError(
                f"{type(module).__name__} does not store its experts as neuqi expects (fused "
                f"{e.gate_up} [E, 2·I, hidden] with gate then up rows, {e.down} [E, hidden, I], no "
                f"bias, act_fn); refusing rather than writing a wrong checkpoint")
        return module


def _has(root: nn.Module, dotted: str) -> bool:
    try:
        root.get_submodule(dotted)
    except AttributeError:
        return False
    return True


LLAMA = Adapter(
    layers="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

# Phi-3 fuses q/k/v into one linear and gate/up into another: one input, one H each.
PHI3 = Adapter(
    layers="model.layers",
    groups=(
        ("self_attn.qkv_proj",),
        ("self_attn.o_proj",),
        ("mlp.gate_up_proj",),
        ("mlp.down_proj",),
    ),
)

# Qwen3-MoE and Mixtral: LLaMA attention, fused 3-D experts (Qwen3-MoE may keep
# dense MLPs in some layers: ``mlp_only_layers``).
MOE = Adapter(layers="model.layers", groups=LLAMA.groups, experts=Experts())
# Mixtral's hub checkpoints call the block ``block_sparse_moe`` and the matrices w1/w3/w2.
MIXTRAL = Adapter(layers="model.layers", groups=LLAMA.groups, experts=Experts(
    hub_path="block_sparse_moe.experts", hub_gate="w1", hub_up="w3", hub_down="w2",
    hub_renames=(("mlp.gate", "block_sparse_moe.gate"),), hub_router="block_sparse_moe.gate"))

# model_type -> adapter; LLaMA-style decoders share one layout.
ADAPTERS: dict[str, Adapter] = {
    "phi3": PHI3,
    "qwen3_moe": MOE,
    "mixtral": MIXTRAL,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma3_text": LLAMA,
    "olmo2": LLAMA,
}


def adapter_for(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {model_type!r}; neuqi supports {sorted(ADAPTERS)}. "
            f"A decoder with the LLaMA layout needs one entry in neuqi.models.adapters.ADAPTERS "
            f"({model_type!r}: LLAMA, or an Adapter naming its layers and linears) and a test"
        ) from None


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def decoder_layers(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    layers = get_module(model, adapter.layers)
    assert isinstance(layers, nn.ModuleList)
    return layers
