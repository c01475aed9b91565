"""Architecture knowledge as data: where the decoder layers and their linears are.

Each entry lists the linears of a decoder layer in calibration order, grouped by
shared input ({q,k,v} → {o} → {gate,up} → {down}); one H serves a whole group.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Adapter:
    layers: str
    groups: tuple[tuple[str, ...], ...]
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    lm_head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


LLAMA = Adapter(
    layers="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

# model_type -> adapter; LLaMA-style decoders share one layout.
ADAPTERS: dict[str, Adapter] = {
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


def quantized_module_names(model: nn.Module, adapter: Adapter) -> list[str]:
    """Full names of every linear the pipeline quantizes, in order."""
    n = len(decoder_layers(model, adapter))
    return [f"{adapter.layers}.{i}.{name}" for i in range(n) for name in adapter.linears]
