"""End to end on tiny random-initialised LLaMA and Qwen2 models."""

import dataclasses
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import neuqi
from neuqi.formats.checkpoint import write_checkpoint
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline import run as run_mod
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import calibrate_and_quantize, quantize_model

from ..conftest import make_tiny_model


def tiny_config(model, calib, out, **kw) -> RunConfig:
    base = dict(model=str(model), bits=3, group_size=48, calib=str(calib), nsamples=4, seqlen=64,
                out_dir=str(out), device="cpu")
    base.update(kw)
    return RunConfig(**base)


def test_loaded_checkpoint_reproduces_the_in_memory_quantized_model(tiny_model, calib_file, tmp_path):
    cfg = tiny_config(tiny_model, calib_file, tmp_path / "runs")
    model = load_model(tiny_model)
    tok = load_tokenizer(tiny_model)
    fp_logits = model(torch.arange(40)[None]).logits
    records, stats, _ = calibrate_and_quantize(cfg, model, tok, torch.device("cpu"))
    assert len(records) == 2 * 7 and all(s["quant_loss"] >= 0 for s in stats)
    x = torch.randint(0, 320, (2, 40))
    expected = model(x).logits
    assert not torch.allclose(model(torch.arange(40)[None]).logits, fp_logits)  # it did change
    out = tmp_path / "ckpt"
    out.mkdir()
    write_checkpoint(model, records, cfg.spec, cfg.zero_point, cfg.act_order, out, tok)
    for loaded in (neuqi.load(out), AutoModelForCausalLM.from_pretrained(out)):
        assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_quantize_writes_a_complete_run_directory(calib_file, tmp_path):
    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    cfg = tiny_config(model, calib_file, tmp_path / "runs", eval_sets=[str(calib_file)],
                      eval_seqlen=64, eval_windows=2)
    run_dir = quantize_model(cfg, quiet=True)
    name = r"tiny-llama\.calib-[0-9a-f]{8}\.n4\.L64\.LDLQ\.3bit\.g48\.Hsort\.neuqi"
    assert re.fullmatch(name, run_dir.name)  # the calibration file's digest after its stem
    files = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "model.safetensors", "result.json", "quantize.log", "tokenizer.json"} <= files
    res = json.loads((run_dir / "result.json").read_text())
    assert res["config"]["bits"] == 3 and res["totals"]["linears"] == 14
    assert res["eval"]["ppl"][str(calib_file)]["ppl"] > 1
    assert res["memory"]["peak_rss_mb"] > 0
    anon = res["memory"]["peak_anon_mb"]
    assert anon is None or 0 < anon <= res["memory"]["peak_rss_mb"]
    qc = json.loads((run_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "neuqi" and qc["zero_point"] == "float" and qc["group_size"] == 48
    assert not list((tmp_path / "runs").glob(".*"))  # no partial folder left behind


@pytest.mark.parametrize("init,zp", [("neuqi_int", "int"), ("minmax", "int")])
def test_integer_zero_runs_store_packed_zeros(init, zp, calib_file, tmp_path):
    model = make_tiny_model(tmp_path / "tiny-qwen2", "qwen2")
    cfg = tiny_config(model, calib_file, tmp_path / "runs", init=init, bits=2, group_size=-1)
    run_dir = quantize_model(cfg, quiet=True)
    from safetensors import safe_open

    with safe_open(run_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qzeros" in keys
    assert "model.layers.0.self_attn.q_proj.bias" in keys  # Qwen2 has q/k/v biases
    assert json.loads((run_dir / "config.json").read_text())["quantization_config"]["zero_point"] == zp


def test_an_interrupted_run_leaves_earlier_results_intact(calib_file, tmp_path, monkeypatch):
    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    cfg = tiny_config(model, calib_file, tmp_path / "runs", init="minmax")
    run_dir = quantize_model(cfg, quiet=True)
    before = (run_dir / "result.json").read_text()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "quantize_layers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(dataclasses.replace(cfg, overwrite=True), quiet=True)
    assert (run_dir / "result.json").read_text() == before
    assert not list((tmp_path / "runs").glob(".*partial"))


def test_unsupported_architecture_names_the_supported_ones(calib_file, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320))
    gpt2.save_pretrained(tmp_path / "g")
    from ..conftest import _tiny_tokenizer

    _tiny_tokenizer().save_pretrained(tmp_path / "g")
    cfg = tiny_config(tmp_path / "g", calib_file, tmp_path / "runs")
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama.*ADAPTERS"):
        quantize_model(cfg, quiet=True)


def test_bad_inputs_get_clear_errors(calib_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_model(tiny_config(tmp_path / "nope", calib_file, tmp_path / "runs"), quiet=True)
    with pytest.raises(FileNotFoundError, match="does not download"):
        quantize_model(tiny_config("HuggingFaceTB/SmolLM2-135M", calib_file, tmp_path / "r"), quiet=True)
    with pytest.raises(ValueError, match="bits"):
        tiny_config(tmp_path, calib_file, tmp_path, bits=1)
    with pytest.raises(ValueError, match="group_size"):
        tiny_config(tmp_path, calib_file, tmp_path, group_size=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = make_tiny_model(tmp_path / "tiny", "llama")
    with pytest.raises(ValueError, match="not writable"):
        quantize_model(tiny_config(model, calib_file, blocker / "runs"), quiet=True)


def test_nan_weights_are_refused(calib_file, tmp_path):
    folder = make_tiny_model(tmp_path / "tiny", "llama")
    m = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    m.save_pretrained(folder)
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(tiny_config(folder, calib_file, tmp_path / "runs"), quiet=True)


def test_corrupt_or_truncated_checkpoints_are_reported(calib_file, tmp_path):
    model = make_tiny_model(tmp_path / "tiny", "llama")
    run_dir = quantize_model(tiny_config(model, calib_file, tmp_path / "runs", init="minmax"), quiet=True)
    st = run_dir / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        neuqi.load(run_dir)
    st.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        neuqi.load(run_dir)


def test_a_damaged_gguf_file_gets_a_clear_error(calib_file, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="could not be read as a model"):
        quantize_model(tiny_config(tmp_path / "m.gguf", calib_file, tmp_path / "runs"), quiet=True)


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os

    from neuqi.io_utils import atomic_dir, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_run_names_carry_every_setting_that_changes_the_result(calib_file, tmp_path):
    def name(calib=calib_file, **kw):
        return tiny_config(tmp_path / "m", calib, tmp_path / "runs", **kw).run_name

    names = {"base": name(), "damp": name(damp=0.1), "seed": name(seed=3),
             "alpha": name(magr=True, magr_alpha=1e-3), "magr": name(magr=True),
             "bf16": name(dtype="bfloat16"), "refit": name(refit=2),
             "select": name(init="neuqi_int", select="mse,minmax,mse"),
             "int": name(init="neuqi_int"), "hpow": name(h_power=0.5),
             "search": name(search="banded"), "cd": name(descent=2), "shrink": name(shrink=0.5),
             "auto": name(shrink="auto")}
    other = tmp_path / "other" / calib_file.name  # same file name, other text
    other.parent.mkdir()
    other.write_text("different calibration text " * 50)
    names["file"] = name(other)
    assert len(set(names.values())) == len(names)
    assert names["damp"].endswith(".damp0.1") and names["seed"].endswith(".seed3")
    assert names["bf16"].endswith(".bf16") and ".magr0.001" in names["alpha"]
    assert names["refit"].endswith(".refit2") and names["select"].endswith(".sel-mse-minmax")
    assert names["hpow"].endswith(".hpow0.5") and names["search"].endswith(".search-banded")
    assert names["cd"].endswith(".cd2")
    assert names["shrink"].endswith(".shrink0.5") and names["auto"].endswith(".shrinkauto")
    assert name(shrink="0.5") == names["shrink"] and name(shrink="AUTO") == names["auto"]
    # what the run records says the same as its name
    typed = tiny_config(tmp_path / "m", calib_file, tmp_path / "runs", init="neuqi_int",
                        select="mse, minmax,mse")
    assert typed.select == "mse,minmax" and typed.to_dict()["select"] == "mse,minmax"
    # Defaults keep the short readable name.
    assert ".damp" not in names["base"] and ".seed" not in names["base"] and "bf16" not in names["base"]


@pytest.mark.parametrize("kw, msg", [
    ({"refit": -1}, ">= 0"),
    ({"descent": -1}, "--descent must be >= 0"),
    ({"descent": 1, "method": "rtn", "init": "minmax"}, "--descent needs a solver"),
    ({"gguf": "Q4_1", "init": "neuqi", "select": "minmax"}, "--select is not available with GGUF"),
    ({"select": "minmax,bogus", "init": "neuqi_int"}, "choose from"),
    ({"select": "minmax"}, "mix float and integer"),
    ({"refit": 2, "method": "rtn", "init": "minmax"}, "need a solver \\(--method"),
    ({"h_power": -1.0}, "h-power"),
    ({"gguf": "Q4_1", "init": "neuqi", "max_clip": 1.0}, "--max-clip is not available with GGUF"),
    ({"gguf": "Q4_K_M", "init": "neuqi", "init_norm": 3.0}, "--init-norm is not available with GGUF"),
    ({"method": "sgd"}, "unknown --method"),
    ({"shrink": "some"}, "--shrink takes A in \\[0, 1\\) or auto"),
    ({"shrink": 1.0}, "--shrink must be 'auto' or in \\[0, 1\\)"),
    ({"shrink": "auto", "method": "rtn", "init": "minmax"}, "--shrink needs a solver"),
    ({"shrink": "auto", "nsamples": 1}, "--shrink auto holds out half"),
    ({"search": "banded", "init": "neuqi_int"}, "--search: .* applies to init 'neuqi'"),
    ({"search": "banded", "init_norm": 3.0}, "--search: .* squared error"),
    ({"search": "fast"}, "--search: search must be one of"),
    ({"search": "banded", "max_clip": 1.0}, "--search: a clip bound takes the grid search"),
    ({"gguf": "Q4_1", "search": "grid"}, "--search is not available with GGUF"),
])
def test_bad_refit_and_select_options_are_refused(calib_file, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(tmp_path / "m", calib_file, tmp_path / "runs", **kw)


def test_refit_and_select_run_end_to_end_and_lower_the_proxy_loss(calib_file, tmp_path):
    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    plain = quantize_model(tiny_config(model, calib_file, tmp_path / "runs", init="neuqi_int"),
                           quiet=True)
    better = quantize_model(tiny_config(model, calib_file, tmp_path / "runs", init="neuqi_int",
                                        select="minmax,mse", refit=3), quiet=True)

    def losses(run):
        layers = json.loads((run / "result.json").read_text())["layers"]
        return {s["name"]: s["quant_loss"] for s in layers}

    a, b = losses(plain), losses(better)
    assert a.keys() == b.keys()
    first = [k for k in a if ".0." in k]  # the first layer's inputs are the same in both runs
    assert first and all(b[k] <= a[k] * (1 + 1e-6) for k in first)
    assert sum(b.values()) < sum(a.values())
    cfg = json.loads((better / "result.json").read_text())["config"]
    assert cfg["refit"] == 3 and cfg["select"] == "minmax,mse"
    load_model(better)  # integer zeros pack as before: transformers loads the run


def test_an_existing_run_is_not_replaced_without_overwrite(calib_file, tmp_path):
    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    cfg = tiny_config(model, calib_file, tmp_path / "runs", init="minmax")
    run_dir = quantize_model(cfg, quiet=True)
    before = (run_dir / "model.safetensors").stat().st_mtime_ns
    (run_dir / "mine.txt").write_text("notes the user keeps in the run folder")
    with pytest.raises(FileExistsError, match="--overwrite"):
        quantize_model(cfg, quiet=True)
    assert (run_dir / "mine.txt").exists()
    assert (run_dir / "model.safetensors").stat().st_mtime_ns == before
    again = quantize_model(tiny_config(model, calib_file, tmp_path / "runs", init="minmax", overwrite=True),
                           quiet=True)
    assert again == run_dir and not (run_dir / "mine.txt").exists()
    assert json.loads((run_dir / "result.json").read_text())["config"]["run_name"] == cfg.run_name


def test_a_mix_run_names_its_mix_in_the_checkpoint(calib_file, tmp_path):
    """The export reads the llama.cpp mix from the checkpoint, so it must survive a save and
    a load through transformers (a plain type records none)."""
    model = make_tiny_model(tmp_path / "tiny-llama", "llama")
    for gguf, mix in (("q3_k_m", "Q3_K_M"), ("Q4_0", None)):
        run_dir = quantize_model(tiny_config(model, calib_file, tmp_path / "runs", gguf=gguf, init="minmax"),
                                 quiet=True)
        qc = json.loads((run_dir / "config.json").read_text())["quantization_config"]
        assert qc.get("gguf_mix") == mix
        loaded = AutoModelForCausalLM.from_pretrained(run_dir).config.quantization_config
        assert (loaded.to_dict() if hasattr(loaded, "to_dict") else loaded).get("gguf_mix") == mix


def test_the_accumulator_splits_even_and_odd_windows_into_folds():
    from neuqi.pipeline.sequential import HessianAccumulator

    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(0))  # 5 windows of 7 tokens
    cpu = torch.device("cpu")
    plain, split = HessianAccumulator(6, cpu), HessianAccumulator(6, cpu, folds=True)
    for batch in (x[:3], x[3:]):  # windows keep alternating across batches
        plain.add(batch)
        split.add(batch)
    assert torch.allclose(split.mean(), plain.mean())
    even, odd = split.folds()
    h = lambda w: (w.reshape(-1, 6).t() @ w.reshape(-1, 6) / (w.shape[0] * 7)).float()  # noqa: E731
    assert torch.allclose(even, h(x[0::2]), atol=1e-6) and torch.allclose(odd, h(x[1::2]), atol=1e-6)
    one = HessianAccumulator(6, cpu, folds=True)
    one.add(x[:1])
    with pytest.raises(ValueError, match="at least 2 windows"):
        one.folds()


def test_a_shrink_auto_run_records_each_linears_choice(tiny_model, calib_file, tmp_path):
    cfg = tiny_config(tiny_model, calib_file, tmp_path / "runs", shrink="auto")
    run_dir = quantize_model(cfg, quiet=True)
    assert run_dir.name.endswith(".shrinkauto")
    layers = json.loads((run_dir / "result.json").read_text())["layers"]
    assert layers and all(0 <= s["shrink"] < 1 and s["shrink_heldout"] for s in layers)
    last: dict[str, float] = {}
    for s in layers:  # each linear's search starts where the previous layer's same linear ended
        assert s["shrink"] == pytest.approx(s["shrink_fold"] / (2 - s["shrink_fold"]))
        role = s["name"].split(".", 3)[-1]
        if role in last:
            assert f"{last[role]:g}" in s["shrink_heldout"]
        last[role] = s["shrink_fold"]
    assert len(last) >= 4
