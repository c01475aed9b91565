"""k-quant GGUF files (Q2_K … Q6_K) run in llama.cpp as we run them.

A tiny random LLaMA whose every row length is a multiple of 256 (hidden 256, MLP 512)
with SmolLM2's real tokenizer, written as a source GGUF by llama.cpp's own converter;
NeUQI + LDLQ under each type, exported, decoded by the ``gguf`` package bit for bit,
then scored by ``llama-perplexity``.  The weights are initialised wide (std 0.1) so the
model's next-token distributions are peaked and a wrong layout cannot hide in a flat
softmax.  As in test_gguf_llamacpp.py, the tolerance comes from llama.cpp's run of
the F32 GGUF of the same float model.
"""

from __future__ import annotations

import json

import pytest

import neuqi
from neuqi.engines import llamacpp
from neuqi.engines.agreement import engine_agreement
from neuqi.formats.export import export_run
from neuqi.formats.export.gguf import open_gguf
from neuqi.models.loading import load_model
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model
from neuqi.quant.gguf_types import KQUANT_TYPES
from tests.conftest import SAMPLE_TEXT, llamacpp_tiny_llama

pytestmark = pytest.mark.integration
CTX, CHUNKS = 128, 4


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    work = tmp_path_factory.mktemp("kquants")
    folder = work / "tiny256"
    model, source = llamacpp_tiny_llama(
        folder, "llama-perplexity", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    bos = model.config.bos_token_id
    text = work / "text.txt"
    text.write_text(SAMPLE_TEXT * 3)
    calib = work / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    fp_r, base = _engine_run(source, text, work, "fp")
    fp = engine_agreement(load_model(folder), base, bos)
    return folder, source, text, calib, work, bos, (fp_r, fp)


def _engine_run(gguf, text, work, name):
    base = work / f"{name}.kl-base.bin"
    r = llamacpp.perplexity(gguf, text, ctx=CTX, chunks=CHUNKS, save_kl_base=base)
    return r, llamacpp.read_kl_base(base)


@pytest.mark.parametrize("gguf_type", KQUANT_TYPES)
def test_llamacpp_runs_our_kquant_file_as_we_do(tiny256, gguf_type):
    folder, source, text, calib, work, bos, (fp_r, fp) = tiny256
    cfg = RunConfig(model=str(folder), gguf=gguf_type, method="ldlq", init="neuqi", nsamples=4, seqlen=64,
                    calib=str(calib), out_dir=str(work / "runs"), device="cpu")
    run_dir = quantize_model(cfg, quiet=True)
    out = work / f"{gguf_type}.gguf"
    res = export_run(run_dir, "gguf", out, gguf_options={"source": source})
    assert res["ok"] and res["bit_exact"] and res["linears"] == 2 * 7
    assert res["linear_types"] == {gguf_type: 14}
    types = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
    assert types["blk.1.ffn_down.weight"] == gguf_type and types["blk.0.attn_q.weight"] == gguf_type

    r, base = _engine_run(out, text, work, gguf_type)
    ours = engine_agreement(neuqi.load(run_dir), base, bos)
    q_vs_fp = engine_agreement(load_model(folder), base, bos)  # the FP model against this file
    print(f"\n{gguf_type}: llama.cpp ppl {r.ppl:.2f}, ours {ours}\nFP model vs this file: {q_vs_fp}"
          f"\nF32 file: llama.cpp ppl {fp_r.ppl:.2f}, fp {fp}")
    assert abs(ours["ppl_engine"] / r.ppl - 1) < 1e-2
    # llama.cpp's F32 run of the float model is the yardstick of its own noise
    assert ours["kl_mean"] < 2 * fp["kl_mean"]
    if cfg.gguf_type.bits <= 3:  # the file is the quantized model, not the FP one
        assert ours["kl_mean"] < 0.5 * q_vs_fp["kl_mean"]


@pytest.mark.parametrize("gguf_type", ["Q2_K", "Q3_K", "Q4_K"])
def test_refit_and_descent_write_what_the_type_stores(tiny256, gguf_type):
    """The refit moves the parameters and the descent the codes after LDLQ; both must
    land on what the file stores (the export decodes every tensor bit for bit), and the
    first layer, whose inputs both runs share, must not end worse (the descent minimises
    the damped loss the solver uses, so the recorded undamped one may differ by a hair)."""
    folder, source, _, calib, work, _, _ = tiny256
    runs = {}
    for extra in ({}, {"refit": 2, "descent": 2}):
        cfg = RunConfig(model=str(folder), gguf=gguf_type, method="ldlq", init="neuqi", nsamples=4, seqlen=64,
                        calib=str(calib), out_dir=str(work / "runs-refit"), device="cpu", **extra)
        runs[bool(extra)] = quantize_model(cfg, quiet=True)
    out = work / f"{gguf_type}.refit.gguf"
    res = export_run(runs[True], "gguf", out, gguf_options={"source": source})
    assert res["ok"] and res["bit_exact"] and res["linear_types"] == {gguf_type: 14}

    def first_layer(run):
        layers = json.loads((run / "result.json").read_text())["layers"]
        return {s["name"]: s["quant_loss"] for s in layers if ".0." in s["name"]}

    plain, better = first_layer(runs[False]), first_layer(runs[True])
    assert plain and all(better[k] <= plain[k] * (1 + 1e-3) for k in plain)
    assert sum(better.values()) < sum(plain.values())
