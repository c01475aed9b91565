"""On the real default model (SmolLM2-135M from the data cache, fetched by `make data`)."""

import os

import pytest
import torch

import neuqi
from neuqi.data.cache import cache_dir
from neuqi.data.corpora import consecutive_windows, load_text, sample_windows, tokenize
from neuqi.eval.perplexity import perplexity
from neuqi.formats.export import export_run
from neuqi.models.adapters import adapter_for
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model
from neuqi.pipeline.sequential import block_hessians
from neuqi.quant import QuantSpec, fake_quantize, gptq_quantize, group_weighted_error, init_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    path = cache_dir() / "models" / "smollm2-135m"
    if not (path / "model.safetensors").exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: `make test` fetches it with `make data`")
        pytest.skip("SmolLM2 not in the data cache (run `make data`)")
    return path


@pytest.fixture(scope="module")
def real_layer(smollm2):
    """Block 3's q_proj and down_proj with real H (c4-sample calibration, 8 × 256 tokens)."""
    model = load_model(smollm2)
    tok = load_tokenizer(smollm2)
    windows = sample_windows(tokenize(load_text("c4-sample")[:200_000], tok), 8, 256)
    layers = block_hessians(model, adapter_for(model.config.model_type), windows, 3)
    return {name.rsplit(".", 1)[-1]: (w, H) for name, w, H in layers}


@pytest.mark.parametrize("name,bits,group", [("q_proj", 3, 64), ("down_proj", 2, 64), ("q_proj", 3, -1)])
def test_neuqi_beats_minmax_on_real_weights_and_real_h(real_layer, name, bits, group):
    w, H = real_layer[name]
    spec = QuantSpec(bits, group)
    h = torch.diagonal(H).float()
    err = {m: group_weighted_error(w, fake_quantize(w, init_params(w, spec, m, h), spec), spec, h).sum()
           for m in ("minmax", "neuqi_int", "neuqi")}
    assert err["neuqi"] < err["neuqi_int"] < err["minmax"]
    proxy = {init: gptq_quantize(w, H, spec, init=init).stats["quant_loss"] for init in ("minmax", "neuqi")}
    assert proxy["neuqi"] < proxy["minmax"]


def test_whole_model_round_trip_and_perplexity(smollm2, tmp_path):
    """4-bit channel-wise LDLQ on the real model: saved, reloaded, and still a language model."""
    cfg = RunConfig(model=str(smollm2), bits=4, group_size=-1, init="minmax", nsamples=4, seqlen=128,
                    out_dir=str(tmp_path), device="cpu")
    run_dir = quantize_model(cfg, quiet=True)
    tok = load_tokenizer(smollm2)
    ids = tokenize(load_text("wiki-sample")[:20_000], tok)
    windows = consecutive_windows(ids, 256, limit=2)
    fp = perplexity(load_model(smollm2), windows, torch.device("cpu"))["ppl"]
    q = perplexity(neuqi.load(run_dir), windows, torch.device("cpu"))["ppl"]
    assert fp < q < 3 * fp, (fp, q)
    size = sum(f.stat().st_size for f in run_dir.glob("*.safetensors"))
    assert size < 0.5 * (smollm2 / "model.safetensors").stat().st_size
    # vLLM's format, re-loaded by transformers + compressed-tensors (fp32 compute); the
    # other formats are checked on tiny models in tests/formats/test_export.py.
    res = export_run(run_dir, "compressed-tensors", tmp_path / "ct")
    assert res["tensors"]["bit_exact"] and res["engine"]["max_rel_logit_diff"] <= 1e-4, res


@pytest.mark.parametrize(
    "name,min_words,starts",
    [("c4-sample", 200_000, None), ("wiki-sample", 400_000, " = Anarchism = "),
     ("brown", 900_000, "The Fulton County"), ("austen-test", 200_000, "PRIDE AND PREJUDICE"),
     ("austen-calib", 500_000, None)],
)
def test_offline_corpora_are_real_text_of_the_expected_size(name, min_words, starts):
    text = load_text(name)
    assert len(text.split()) > min_words
    if starts:
        assert text.startswith(starts)
    assert "<ref" not in text and text.count("[[") < 10  # markup stripped (a few table cells remain)


def test_zero_shot_fp_beats_chance_and_2bit_rtn_drops(smollm2, tmp_path):
    """austen_lambada through lm-eval: the FP model predicts many last words; 2-bit RTN
    (no calibration, no search) loses most of them."""
    from neuqi.eval.zeroshot import lm_eval_model, run_tasks

    tok = load_tokenizer(smollm2)
    cfg = RunConfig(model=str(smollm2), bits=2, group_size=64, method="rtn", init="minmax", nsamples=2,
                    seqlen=64, out_dir=str(tmp_path), device="cpu")
    accs = {}
    for name, model in (("fp", load_model(smollm2)), ("rtn2", neuqi.load(quantize_model(cfg, quiet=True)))):
        lm = lm_eval_model(model, tok, 8, torch.device("cpu"), "hf")
        accs[name] = run_tasks(lm, ["austen_lambada"], cache_dir(), limit=60)["tasks"]["austen_lambada"]
    assert accs["fp"]["acc"] > 0.25, accs
    assert accs["rtn2"]["acc"] < accs["fp"]["acc"] / 2
    assert accs["rtn2"]["perplexity"] > 10 * accs["fp"]["perplexity"]
