"""The Python API on in-memory models: same checkpoint as the CLI, usable at once."""

import json
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import neuqi
from neuqi.cli import app
from neuqi.formats.qlinear import QuantLinear
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import QuantConfig, RunConfig

from .conftest import make_tiny_model

OPTIONS = {"bits": 3, "group_size": 32, "init": "neuqi_int", "nsamples": 4, "seqlen": 64, "seed": 3}


def _cli_args(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_api_and_cli_write_identical_checkpoints(arch, calib_file, tmp_path):
    folder = make_tiny_model(tmp_path / f"tiny-{arch}", arch)
    res = CliRunner().invoke(app, ["quantize", str(folder), "--calib", str(calib_file), *_cli_args(OPTIONS),
                                   "--out-dir", str(tmp_path / "runs"), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    cli_run = tmp_path / "runs" / RunConfig(model=str(folder), calib=str(calib_file), **OPTIONS).run_name

    model, tok = load_model(folder), load_tokenizer(folder)
    api_run = tmp_path / "api-run"
    # keyword options on one architecture, a QuantConfig (calib given beside it) on the other
    how = OPTIONS if arch == "llama" else {"config": QuantConfig(**OPTIONS)}
    out = neuqi.quantize(model, tok, calib=str(calib_file), save=api_run, device="cpu", **how)

    assert out is model
    cli_t, api_t = load_file(cli_run / "model.safetensors"), load_file(api_run / "model.safetensors")
    assert cli_t.keys() == api_t.keys()
    for k in cli_t:
        assert torch.equal(cli_t[k], api_t[k]), k
    cli_cfg = json.loads((cli_run / "result.json").read_text())["config"]
    api_cfg = json.loads((api_run / "result.json").read_text())["config"]
    names = QuantConfig.option_names()
    assert {n: api_cfg[n] for n in names} == {n: cli_cfg[n] for n in names}

    # the returned model is the quantized one, the same as the saved run loaded back
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    x = torch.randint(0, 320, (2, 24))
    torch.testing.assert_close(model(x).logits, neuqi.load(api_run)(x).logits, rtol=1e-5, atol=1e-5)


def test_every_quant_option_is_a_quantize_flag():
    res = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for f in fields(QuantConfig):
        flag = f.metadata["flags"][0] if f.metadata["flags"] else f"--{f.name.replace('_', '-')}"
        assert flag in res.output, flag


def test_token_windows_and_texts_calibrate_without_a_corpus(tmp_path):
    folder = make_tiny_model(tmp_path / "tiny", "llama")
    tok = load_tokenizer(folder)
    windows = torch.randint(0, 320, (3, 48))
    model = neuqi.quantize(load_model(folder), calib=windows, bits=2, group_size=32, init="minmax",
                           save=tmp_path / "run", device="cpu")
    cfg = json.loads((tmp_path / "run" / "result.json").read_text())["config"]
    assert (cfg["calib"], cfg["nsamples"], cfg["seqlen"]) == ("tokens", 3, 48)
    assert model.quantization_config["bits"] == 2

    texts = ["Calibration text shows which input channels matter most for the output."] * 30
    model = neuqi.quantize(load_model(folder), tok, calib=texts, nsamples=2, seqlen=32, device="cpu",
                           config=None, bits=4, group_size=-1)
    assert model.model.layers[1].mlp.down_proj.group_size == -1


def test_bad_api_input_gets_a_clear_error(tmp_path):
    folder = make_tiny_model(tmp_path / "tiny", "llama")
    model, tok = load_model(folder), load_tokenizer(folder)
    with pytest.raises(ValueError, match=r"unknown option.*group_siz"):
        neuqi.quantize(model, tok, group_siz=64)
    with pytest.raises(ValueError, match="tokenizer"):
        neuqi.quantize(model, None)
    with pytest.raises(ValueError, match=r"\[n, seqlen\]"):
        neuqi.quantize(model, tok, calib=torch.randn(2, 8))
    with pytest.raises(ValueError, match="either config"):
        neuqi.quantize(model, tok, config=QuantConfig(), bits=2)
    with pytest.raises(ValueError, match="bits"):
        neuqi.quantize(model, tok, bits=9)
    model.model.layers[0].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        neuqi.quantize(model, calib=torch.randint(0, 320, (2, 16)), device="cpu")
    assert not isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)  # untouched on failure


def test_saving_over_an_existing_run_is_refused_before_any_work(tmp_path, monkeypatch):
    import neuqi.api as api_mod

    folder = make_tiny_model(tmp_path / "tiny", "llama")
    model, tok = load_model(folder), load_tokenizer(folder)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    monkeypatch.setattr(api_mod, "calibrate_and_quantize", lambda *a, **k: pytest.fail("worked anyway"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        neuqi.quantize(model, tok, calib=torch.randint(0, 300, (2, 32)), bits=3, group_size=32, save=taken)
    assert (taken / "notes.txt").read_text() == "keep me"
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
