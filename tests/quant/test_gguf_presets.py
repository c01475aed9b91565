"""The llama.cpp mixes as data: which linear gets which type, and how options spell it out.

The integration test (tests/integration/test_gguf_presets.py) checks every mix against
llama-quantize's own files; these check the rules on model shapes too large to build.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from neuqi.pipeline.config import QuantConfig
from neuqi.quant.gguf_presets import PRESETS, preset_plan

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linears(n_layers: int, hidden: int, ffn: int) -> dict[str, int]:
    return {f"model.layers.{i}.{r}": (ffn if r == "mlp.down_proj" else hidden)
            for i in range(n_layers) for r in ROLES}


def test_q4_k_m_raises_v_and_down_in_the_first_and_last_eighth_and_every_third_layer():
    plan = preset_plan("Q4_K_M", linears(32, 4096, 14336), 32, 32, 8, 4096, tied=False)
    raised = {i for i in range(32) if plan.linears[f"model.layers.{i}.mlp.down_proj"].name == "Q6_K"}
    assert raised == {0, 1, 2, 3, 28, 29, 30, 31, 6, 9, 12, 15, 18, 21, 24, 27}
    v = {i for i in range(32) if plan.linears[f"model.layers.{i}.self_attn.v_proj"].name == "Q6_K"}
    assert v == raised
    others = {t.name for n, t in plan.linears.items() if not n.endswith(("v_proj", "down_proj"))}
    assert others == {"Q4_K"}
    assert (plan.embedding, plan.output) == ("Q4_K", "Q6_K")


def test_rows_no_k_quant_fits_fall_back_as_llama_quantize_does():
    # Qwen2.5-0.5B: hidden 896, FFN 4864 (only down_proj's rows fit a k-quant), tied head
    plan = preset_plan("Q3_K_M", linears(24, 896, 4864), 24, 14, 2, 896, tied=True)
    assert plan.linears["model.layers.5.self_attn.q_proj"].name == "Q4_0"  # Q3_K's fallback
    assert plan.linears["model.layers.5.self_attn.v_proj"].name == "Q5_0"  # Q4_K's
    assert plan.linears["model.layers.0.self_attn.v_proj"].name == "Q5_1"  # Q5_K's
    assert plan.linears["model.layers.0.mlp.down_proj"].name == "Q5_K"  # i < n/16
    assert plan.linears["model.layers.5.mlp.down_proj"].name == "Q4_K"
    assert (plan.embedding, plan.output) == ("Q8_0", "Q8_0")  # tied, rows of 896


def test_gqa_and_70b_rules():
    plan = preset_plan("Q2_K_S", linears(32, 4096, 14336), 32, 32, 8, 4096, tied=False, model_type="llama")
    assert plan.linears["model.layers.20.self_attn.v_proj"].name == "Q4_K"  # grouped-query: gqa 4
    plan = preset_plan("Q2_K_S", linears(32, 4096, 14336), 32, 32, 16, 4096, tied=False, model_type="llama")
    assert plan.linears["model.layers.20.self_attn.v_proj"].name == "Q2_K"  # gqa 2
    lin = linears(80, 8192, 28672)
    plan = preset_plan("Q3_K_S", lin, 80, 64, 8, 8192, tied=False, model_type="llama")
    assert plan.linears["model.layers.40.self_attn.v_proj"].name == "Q5_K"  # LLM_TYPE_70B
    assert plan.linears["model.layers.40.self_attn.k_proj"].name == "Q3_K"


def test_options_name_the_mix_and_spell_it_out_per_linear_with_the_users_overrides_winning():
    cfg = QuantConfig(gguf="q4_k_m", gguf_tensor="mlp.gate_proj=Q8_0,layers.0.mlp.down_proj=Q5_K")
    assert (cfg.gguf, cfg.bits, cfg.group_size, cfg.zero_point) == ("Q4_K_M", 4, 32, "offset")
    assert "Q4_K_M" in cfg.name_parts()
    model = SimpleNamespace(num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
                            hidden_size=256, tie_word_embeddings=True, model_type="llama")
    opts = cfg.resolve_gguf_mix(linears(8, 256, 512), model)
    assert opts.gguf == "Q4_K"
    assert opts.requested_gguf_type("model.layers.3.mlp.down_proj").name == "Q6_K"
    assert opts.requested_gguf_type("model.layers.4.mlp.down_proj").name == "Q4_K"
    assert opts.requested_gguf_type("model.layers.0.mlp.down_proj").name == "Q5_K"  # the user's
    assert opts.requested_gguf_type("model.layers.4.mlp.gate_proj").name == "Q8_0"
    plain = QuantConfig(gguf="Q4_K")
    assert plain.resolve_gguf_mix(linears(8, 256, 512), model) is plain


def test_an_unknown_name_lists_types_and_mixes():
    with pytest.raises(ValueError, match=r"Q4_0.*Q4_K_M"):
        QuantConfig(gguf="Q4_K_X")
    assert set(PRESETS) >= {"Q3_K_M", "Q4_K_M", "Q5_K_M"}
