"""Our GGUF files in llama.cpp itself (built by `make test`), on the real SmolLM2-135M.

The tolerance for "llama.cpp runs it as we do" is calibrated on llama.cpp's run of the
F32 GGUF of the same float model: its CPU kernels differ from torch's even there, and
for quantized weights its dot products also quantize the activations (to 8 bits), so
the quantized file is allowed a few times the F32 discrepancy.
"""

from __future__ import annotations

import os

import pytest

import neuqi
from neuqi.data.cache import cache_dir
from neuqi.data.fetch import DEFAULT_MODEL, MODELS, fetch_corpus
from neuqi.engines import llamacpp
from neuqi.engines.agreement import engine_agreement
from neuqi.formats.export import export_run
from neuqi.formats.export.gguf import open_gguf, write_dense_gguf
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model

pytestmark = pytest.mark.integration
CTX, CHUNKS = 256, 3


@pytest.fixture(scope="module")
def smollm2():
    path = cache_dir() / "models" / "smollm2-135m"
    source = cache_dir() / "gguf" / MODELS[DEFAULT_MODEL].gguf_name
    if not (path / "model.safetensors").exists() or not source.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: `make test` fetches it with `make data`")
        pytest.skip("SmolLM2 not in the data cache (run `make data`)")
    llamacpp.tool("llama-perplexity")  # fails with how to build it
    return path, source


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _engine_base(gguf, work, name):
    text = fetch_corpus("wiki-sample", cache_dir())
    base = work / f"{name}.kl-base.bin"
    r = llamacpp.perplexity(gguf, text, ctx=CTX, chunks=CHUNKS, save_kl_base=base)
    return r, llamacpp.read_kl_base(base)


@pytest.fixture(scope="module")
def fp_agreement(smollm2, work):
    folder, source = smollm2
    fp = write_dense_gguf(folder, source, work / "fp.f32.gguf")
    r, base = _engine_base(fp, work, "fp")
    tok = load_tokenizer(folder)
    agree = engine_agreement(load_model(folder), base, tok.bos_token_id)
    return r, agree


# Round-to-nearest codes (LDLQ's codes are covered on a tiny model in test_cli and
# test_gguf_kquants, and end to end by bench/gguf_vs_llamacpp.py): one symmetric type
# with NeUQI's steps (negative steps flip the codes) and one with a float offset. Q4_1
# takes llama.cpp's own min-max parameters here: its NeUQI search costs ~7 minutes on
# SmolLM2's 210 linears on 2 cores, and NeUQI's offsets reach llama.cpp in
# test_gguf_kquants (Q4_K, Q5_K) on a tiny model.  The NeUQI file mixes types per
# tensor: Q4_0 on q/o/down_proj and Q8_0 (its cheap step search) on the other four,
# which searches 90 linears instead of 210 and also puts a per-tensor mix through
# llama.cpp.
MIXED = "self_attn.k_proj=Q8_0,self_attn.v_proj=Q8_0,mlp.gate_proj=Q8_0,mlp.up_proj=Q8_0"


@pytest.mark.parametrize(("gguf_type", "init", "tensors"), [("Q4_0", "neuqi", MIXED), ("Q4_1", "minmax", "")])
def test_llamacpp_runs_our_gguf_as_we_do(smollm2, work, fp_agreement, gguf_type, init, tensors, monkeypatch):
    folder, source = smollm2
    if init == "neuqi":
        # The compiled search, as users run it (the suite is eager elsewhere). Compiled
        # and eager agree up to rounding (best_zero: tests/quant/test_init.py), so the
        # figures below moved a little from the eager ones. SmolLM2's Q4_0 linears took
        # ~150 s eager, ~66 s compiled plus the compilation.
        monkeypatch.setenv("NEUQI_COMPILE", "1")
    cfg = RunConfig(model=str(folder), gguf=gguf_type, gguf_tensor=tensors, method="rtn", init=init,
                    nsamples=2, seqlen=128, out_dir=str(work / "runs"), device="cpu")
    run_dir = quantize_model(cfg, quiet=True)
    out = work / f"{gguf_type}.gguf"
    res = export_run(run_dir, "gguf", out, gguf_options={"source": source})
    assert res["ok"] and res["bit_exact"] and res["linears"] == 30 * 7
    reader = open_gguf(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type and types["token_embd.weight"] == "Q8_0"
    assert types["blk.29.ffn_down.weight"] == gguf_type
    assert types["blk.29.ffn_up.weight"] == ("Q8_0" if tensors else gguf_type)

    r, base = _engine_base(out, work, gguf_type)
    tok = load_tokenizer(folder)
    ours = engine_agreement(neuqi.load(run_dir), base, tok.bos_token_id)
    fp_r, fp = fp_agreement
    print(f"\n{gguf_type}: llama.cpp ppl {r.ppl}, ours {ours}\nF32: llama.cpp ppl {fp_r.ppl}, fp {fp}")
    # llama.cpp's own perplexity is the one it printed (its stored log-probs are 16-bit).
    assert abs(ours["ppl_engine"] / r.ppl - 1) < 1e-2
    assert abs(fp["ppl_engine"] / fp_r.ppl - 1) < 1e-2
    # F32 GGUF vs torch, measured 2026-12-06 (3 chunks of 256): |dNLL| 0.089, KL 0.0175,
    # top-1 94.5 %; Q4_0/Q8_0 (compiled search): |dNLL| 0.116, KL 0.0202, top-1 92.1 %,
    # PPL 28.92 vs 29.41 (2026-12-05, eager: 0.110, 0.0196, 92.9 %, 28.90 vs 29.10).
    assert fp["nll_abs_mean"] < 0.15 and fp["top1_agree"] > 0.9
    assert abs(ours["ppl_ours"] / ours["ppl_engine"] - 1) < 0.03
    assert ours["nll_abs_mean"] < 2 * fp["nll_abs_mean"]
    assert ours["kl_mean"] < 2 * fp["kl_mean"]
    assert ours["top1_agree"] > 0.9
    # and it is a 4/5-bit model, not the FP one: llama.cpp's PPL moved from the F32 one
    assert r.ppl != fp_r.ppl


def test_export_refuses_a_run_not_quantized_for_gguf(smollm2, work):
    folder, source = smollm2
    cfg = RunConfig(model=str(folder), bits=4, group_size=32, method="rtn", init="minmax", nsamples=1,
                    seqlen=32, out_dir=str(work / "runs"), device="cpu")
    run_dir = quantize_model(cfg, quiet=True)
    with pytest.raises(ValueError, match="--gguf TYPE"):
        export_run(run_dir, "gguf", work / "x.gguf", gguf_options={"source": source})
    assert not (work / "x.gguf").exists()
    truncated = work / "trunc.gguf"
    truncated.write_bytes(source.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable GGUF"):  # how the exporter opens a source
        open_gguf(truncated)
