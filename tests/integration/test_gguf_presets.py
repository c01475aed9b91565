"""llama-quantize's mixes (Q4_K_M …): neuqi gives every tensor the type llama.cpp gives it.

An 8-layer random LLaMA (so the "first and last eighth, every third layer" rule
picks layers 0, 3, 6 and 7), with grouped-query attention (4 heads, 1 KV head) and
an MLP width of 384, which no k-quant fits, so the fallbacks show. Every mix is
run through llama-quantize itself on the same F32 GGUF, and the tensor types in its
file are the yardstick. Then one mix end to end: quantize, export, same types in
every tensor as llama-quantize's file, decoded bit for bit, and llama.cpp's
perplexity agrees with ours.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import neuqi
from neuqi.engines import llamacpp
from neuqi.engines.agreement import engine_agreement
from neuqi.formats.export import export_run
from neuqi.formats.export.gguf import open_gguf
from neuqi.models.loading import load_model
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model
from neuqi.quant.gguf_presets import PRESETS, preset_plan
from tests.conftest import SAMPLE_TEXT, llamacpp_tiny_llama

pytestmark = pytest.mark.integration
LAYERS = 8


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    work = tmp_path_factory.mktemp("presets")
    folder = work / "tiny"
    model, source = llamacpp_tiny_llama(
        folder, "llama-quantize", hidden_size=256, intermediate_size=384, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    linears = {n: m.in_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    return folder, source, work, model.config, linears


def _gguf_name(hf: str) -> str:
    i, module = hf.split(".")[2], hf.rsplit(".", 1)[-1]
    role = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[module]
    return f"blk.{i}.{role}.weight"


def _llama_types(source, work, mix: str) -> dict[str, str]:
    out = work / f"llama-{mix}.gguf"
    if not out.exists():
        imatrix = None
        if mix == "Q2_K_S":  # llama-quantize refuses it without one (the types do not depend on it)
            text = work / "imatrix.txt"
            text.write_text(SAMPLE_TEXT * 3)
            imatrix = work / "tiny.imatrix.gguf"
            llamacpp.imatrix(source, text, imatrix, ctx=128)
        llamacpp.quantize(source, out, mix, pure=False, imatrix=imatrix)
    return {t.name: t.tensor_type.name for t in open_gguf(out).tensors if t.name.endswith(".weight")}


@pytest.mark.parametrize("mix", list(PRESETS))
def test_every_tensor_gets_llama_quantizes_type(tiny_gqa, mix):
    _folder, source, work, cfg, linears = tiny_gqa
    theirs = _llama_types(source, work, mix)
    plan = preset_plan(mix, linears, LAYERS, cfg.num_attention_heads, cfg.num_key_value_heads,
                       cfg.hidden_size, cfg.tie_word_embeddings, "llama")
    ours = {_gguf_name(n): t.name for n, t in plan.linears.items()}
    ours |= {"token_embd.weight": plan.embedding, "output.weight": plan.output}
    assert ours == {k: v for k, v in theirs.items() if k in ours}
    assert len(ours) == len(linears) + 2
    # the mix is not uniform: it raises some tensors (and the MLP rows of 384 fall back)
    assert len(set(ours.values())) > 1


def test_a_mix_run_exports_the_file_llama_quantize_makes_and_runs_as_ours(tiny_gqa):
    folder, source, work, cfg, _linears = tiny_gqa
    calib, text = work / "calib.txt", work / "text.txt"
    calib.write_text(SAMPLE_TEXT)
    text.write_text(SAMPLE_TEXT * 3)
    run = RunConfig(model=str(folder), gguf="q4_k_m", method="ldlq", init="minmax", nsamples=4, seqlen=64,
                    calib=str(calib), out_dir=str(work / "runs"), device="cpu")
    assert run.gguf == "Q4_K_M" and run.bits == 4 and "Q4_K_M" in run.run_name
    run_dir = quantize_model(run, quiet=True)
    out = work / "ours-Q4_K_M.gguf"
    res = export_run(run_dir, "gguf", out, gguf_options={"source": source})
    assert res["ok"] and res["bit_exact"] and res["type"] == "Q4_K_M"
    assert (res["embedding_type"], res["output_type"]) == ("Q4_K", "Q6_K")
    reader = open_gguf(out)
    ours = {t.name: t.tensor_type.name for t in reader.tensors if t.name.endswith(".weight")}
    assert ours == _llama_types(source, work, "Q4_K_M")
    assert int(reader.fields["general.file_type"].contents()) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M

    # The checkpoint itself names the mix: a copy without the run's result.json exports
    # the same file types.
    assert json.loads((run_dir / "config.json").read_text())["quantization_config"]["gguf_mix"] == "Q4_K_M"
    bare = work / "bare-checkpoint"
    shutil.copytree(run_dir, bare)
    (bare / "result.json").unlink()
    res_bare = export_run(bare, "gguf", work / "bare.gguf", gguf_options={"source": source})
    assert (res_bare["type"], res_bare["embedding_type"], res_bare["output_type"]) == (
        "Q4_K_M", "Q4_K", "Q6_K")

    # The engine: with the embedding and head kept F32 (ours keeps them FP), llama.cpp
    # runs the mixed file as we run the run; its F32 file of the FP model is the yardstick.
    dense = work / "ours-Q4_K_M-f32-dense.gguf"
    export_run(run_dir, "gguf", dense, gguf_options={"source": source, "embed_type": "F32",
                                                      "output_type": "F32"})

    def engine(gguf, name):
        r = llamacpp.perplexity(gguf, text, ctx=128, chunks=4, save_kl_base=work / f"{name}.kl-base.bin")
        return r, llamacpp.read_kl_base(work / f"{name}.kl-base.bin")

    _, fp_base = engine(source, "fp")
    fp = engine_agreement(load_model(folder), fp_base, cfg.bos_token_id)
    r, base = engine(dense, "mix")
    agree = engine_agreement(neuqi.load(run_dir), base, cfg.bos_token_id)
    assert abs(agree["ppl_engine"] / r.ppl - 1) < 1e-2
    assert agree["kl_mean"] < 2 * fp["kl_mean"]
