"""llama.cpp's k-quant mixes (``Q4_K_M`` …): which GGUF type each tensor of a model gets.

``llama-quantize model.gguf out.gguf Q4_K_M`` does not put every linear at Q4_K: its
``llama_tensor_get_type`` (llama-quant.cpp) gives some tensors more bits by their role
and layer. For example, Q4_K_M puts ``attn_v`` and ``ffn_down`` at Q6_K in the first
and last eighth of the layers and in every third layer between them, and the output
head at Q6_K. :func:`preset_plan` repeats those rules for the mixes of uniform block
types. So ``neuqi quantize --gguf Q4_K_M`` makes a file with the same type in every
tensor as llama-quantize's, and the two compare like with like. The rules are for
dense (non-MoE) models. Three of llama.cpp's special cases are left out: Falcon, the
8-expert MoE models, and the non-uniform IQ types. A ``--gguf-tensor`` override wins
over the mix, as ``--tensor-type`` does in llama-quantize.

Pure data and integer logic: the caller supplies the model's shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neuqi.quant.gguf_types import GGUFType, gguf_type, type_for_row


@dataclass(frozen=True)
class Preset:
    """One mix: ``base`` for every linear the rules do not name (llama_ftype ``ftype``)."""

    name: str
    base: str
    ftype: int


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("Q2_K_S", "Q2_K", 21),
        Preset("Q3_K_S", "Q3_K", 11),
        Preset("Q3_K_M", "Q3_K", 12),
        Preset("Q3_K_L", "Q3_K", 13),
        Preset("Q4_K_S", "Q4_K", 14),
        Preset("Q4_K_M", "Q4_K", 15),
        Preset("Q5_K_S", "Q5_K", 16),
        Preset("Q5_K_M", "Q5_K", 17),
    )
}

# Linear roles as llama.cpp's tensor categories, by the HF module name's last part.
ROLES: dict[str, str] = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "qkv_proj": "attn_qkv", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
    "gate_up_proj": "ffn_up",
}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_preset(name: str) -> bool:
    return name.strip().upper() in PRESETS


def preset(name: str) -> Preset:
    key = name.strip().upper()
    if key not in PRESETS:
        raise ValueError(f"unknown GGUF mix {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _linear_type(p: Preset, role: str, i: int, n: int, gqa: int, is_70b: bool) -> str:
    """The type llama_tensor_get_type_impl gives linear ``role`` of layer ``i`` of ``n``."""
    f, t = p.name, p.base
    if role == "attn_v":
        if f == "Q2_K_S" and gqa >= 4:
            t = "Q4_K"
        elif f == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif f == "Q3_K_L":
            t = "Q5_K"
        elif f in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            t = "Q6_K"
        elif f == "Q4_K_S" and i < 4:
            t = "Q5_K"
        if is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
    elif role == "ffn_down":
        if f == "Q2_K_S" and i < n // 8:
            t = "Q4_K"
        elif f == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif f == "Q3_K_L":
            t = "Q5_K"
        elif f in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            t = "Q6_K"
        elif f == "Q4_K_S" and i < n // 8:
            t = "Q5_K"
    elif role == "attn_output":
        t = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(f, t)
    elif role == "attn_qkv":
        t = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(f, t)
    return t


@dataclass(frozen=True)
class PresetPlan:
    """Every linear's type (after row-length fallbacks), and the dense tensors' types."""

    linears: dict[str, GGUFType]
    embedding: str
    output: str


def dense_type(p: Preset, n_in: int, role: str, tied: bool) -> str:
    """Type of the token embedding or output head (``role``: ``"embedding"``/``"output"``).

    The output head, and a token embedding tied to it, get Q6_K when their rows fit a
    k-quant and Q8_0 otherwise. An untied embedding keeps the mix's base type, with
    the row-length fallback.
    """
    if role == "output" or tied:
        return "Q6_K" if n_in % 256 == 0 else "Q8_0"
    return type_for_row(gguf_type(p.base), n_in).name


def preset_plan(
    name: str, linears: dict[str, int], n_layers: int, n_head: int, n_kv_head: int, hidden: int,
    tied: bool, model_type: str = "",
) -> PresetPlan:
    """The mix ``name`` for a model: ``linears`` maps each linear's HF name to its row
    length (in_features). Linears outside a decoder layer, or of a role the rules do
    not know, get the mix's base type."""
    p = preset(name)
    gqa = max(1, n_head // max(n_kv_head, 1))
    # llama.cpp's LLM_TYPE_70B: an 80-layer Llama with grouped-query attention
    is_70b = model_type == "llama" and n_layers == 80 and n_kv_head < n_head
    out: dict[str, GGUFType] = {}
    for full, n_in in linears.items():
        m = _LAYER.search(full)
        role = ROLES.get(full.rsplit(".", 1)[-1], "")
        t = p.base if m is None else _linear_type(p, role, int(m.group(1)), n_layers, gqa, is_70b)
        out[full] = type_for_row(gguf_type(t), n_in)
    return PresetPlan(out, dense_type(p, hidden, "embedding", tied), dense_type(p, hidden, "output", tied))
