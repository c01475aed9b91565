"""The command line, driven as a user would (typer's runner)."""

import json

import pytest
from typer.testing import CliRunner

from neuqi.cli import app

from .conftest import make_tiny_model

runner = CliRunner()


def test_quantize_then_eval_with_kl_merges_into_the_run(calib_file, tmp_path):
    model = make_tiny_model(tmp_path / "tiny", "llama")
    out = tmp_path / "runs"
    res = runner.invoke(app, ["quantize", str(model), "--bits", "2", "--group-size", "32",
                              "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "64",
                              "--out-dir", str(out), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    (run_dir,) = out.glob("tiny.calib-*.n4.L64.LDLQ.2bit.g32.Hsort.neuqi")  # the file's digest
    res = runner.invoke(app, ["eval", str(run_dir), "--ppl", str(calib_file), "--seqlen", "64",
                              "--windows", "3", "--kl", str(model), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    ev = json.loads((run_dir / "result.json").read_text())["eval"]
    assert ev["ppl"][str(calib_file)]["windows"] == 3
    kl = ev["kl"][str(calib_file)]
    assert kl["kl"] > 0 and 0 <= kl["top1_agreement"] <= 1

    # the same run through export, verify, distill and report
    res = runner.invoke(app, ["export", str(run_dir), "-f", "hqq", "--out", str(tmp_path / "hqq")])
    assert res.exit_code == 0 and "bit-exact" in res.output, res.output
    res = runner.invoke(app, ["verify", str(tmp_path / "hqq"), "--against", str(run_dir)])
    assert res.exit_code == 0 and "top-1 agreement 1.0000" in res.output, res.output
    res = runner.invoke(app, ["export", str(run_dir), "-f", "gptq", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "neuqi_int" in res.output
    res = runner.invoke(app, ["distill", str(run_dir), "--teacher", str(model), "--data", str(calib_file),
                              "--nsamples", "4", "--seqlen", "64", "--eval", str(calib_file),
                              "--eval-windows", "1", "--device", "cpu", "-q"])
    assert res.exit_code == 0 and "ppl after" in res.output, res.output
    res = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0 and "NeUQI+LDLQ+distill" in res.output, res.output


def test_errors_are_one_clear_line_and_a_nonzero_exit(tmp_path):
    res = runner.invoke(app, ["quantize", str(tmp_path / "missing"), "-q"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["quantize", str(tmp_path), "--bits", "9", "-q"])
    assert res.exit_code == 2 and "bits" in res.output


def test_demo_prints_fp_gptq_and_neuqi_rows(tmp_path, monkeypatch):
    """The demo's flow and table on a tiny model, with the offline corpora stubbed
    by a local text (the real corpora are checked in tests/integration)."""
    from rich.console import Console

    from neuqi import demo
    from neuqi.pipeline import run

    from .conftest import SAMPLE_TEXT

    model = make_tiny_model(tmp_path / "tiny", "llama")
    monkeypatch.setattr(run, "load_text", lambda name, cache=None, split="train": SAMPLE_TEXT)
    console = Console(record=True, width=200)
    rows = demo.run_demo(tmp_path / "cache", tmp_path / "runs", 4, 64, 2, console, model=model,
                         calib="c4-sample", eval_seqlen=64)
    assert [r[0] for r in rows] == ["FP (de-quantized Q4_1 GGUF)", "GPTQ/LDLQ + min-max", "NeUQI + LDLQ"]
    text = console.export_text()
    assert "NeUQI + LDLQ" in text and f"{rows[2][2]['wiki-sample']['ppl']:.3f}" in text


def test_quantize_for_a_gguf_type_stores_what_the_type_stores(calib_file, tmp_path):
    """--gguf on a tiny model: a normal run whose codes and block parameters are the
    type's own; a run for another kind refuses --format gguf with the fix."""
    import torch

    import neuqi
    from neuqi.formats.export.source import read_source
    from neuqi.quant.gguf_types import GGUF_TYPES, block_fields
    from neuqi.quant.grid import QuantParams

    model = make_tiny_model(tmp_path / "tiny", "llama")
    out = tmp_path / "runs"
    res = runner.invoke(app, ["quantize", str(model), "--gguf", "q5_1", "--calib", str(calib_file),
                              "--nsamples", "4", "--seqlen", "64", "--out-dir", str(out), "--device", "cpu",
                              "-q"])
    assert res.exit_code == 0, res.output
    (run_dir,) = out.glob("tiny.calib-*.n4.L64.LDLQ.Q5_1.Hsort.neuqi")
    qc = json.loads((run_dir / "config.json").read_text())["quantization_config"]
    assert qc["gguf_type"] == "Q5_1" and qc["bits"] == 5 and qc["group_size"] == 32
    src = read_source(run_dir)
    assert src.zero_point == "offset"
    for lin in src.linears.values():  # every block's step and offset is storable as Q5_1
        block_fields(QuantParams(lin.scale.float(), lin.zero.float(), lin.offset.float()), GGUF_TYPES["Q5_1"])
    ids = torch.randint(0, 300, (1, 16))
    assert torch.isfinite(neuqi.load(run_dir)(ids).logits).all()

    res = runner.invoke(app, ["quantize", str(model), "--gguf", "Q3_0", "-q"])
    assert res.exit_code == 2 and "choose a type (Q4_0" in res.output and "Q4_K_M" in res.output
    res = runner.invoke(app, ["quantize", str(model), "--gguf", "Q4_0", "--init", "neuqi_int", "-q"])
    assert res.exit_code == 2 and "neuqi or minmax" in res.output
    res = runner.invoke(app, ["export", str(run_dir), "-f", "hqq", "--out", str(tmp_path / "h")])
    assert res.exit_code == 2 and "--format gguf" in res.output


def test_gguf_tensor_overrides_and_row_fallbacks(calib_file, tmp_path):
    """--gguf Q3_K on rows of 256 and of 64: k-quant where the row fits, Q4_0 where it
    does not, --gguf-tensor for one projection; each linear's type is recorded, the run
    loads with the logits of the model it quantized, and its name says the override."""
    import torch

    import neuqi
    from neuqi.formats.export.source import read_source
    from neuqi.pipeline.config import RunConfig
    from neuqi.quant.gguf_types import GGUF_TYPES, block_fields
    from neuqi.quant.grid import QuantParams
    from neuqi.quant.kquants import kquant_fields

    model = make_tiny_model(tmp_path / "tiny", "llama", hidden=64, intermediate=256)
    out = tmp_path / "runs"
    res = runner.invoke(app, ["quantize", str(model), "--gguf", "Q3_K", "--gguf-tensor", "mlp.up_proj=Q6_K",
                              "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "64",
                              "--out-dir", str(out), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    (run_dir,) = out.glob("tiny.calib-*.LDLQ.Q3_K.mlp.up_proj-Q6_K.Hsort.neuqi")
    qc = json.loads((run_dir / "config.json").read_text())["quantization_config"]
    types = qc["gguf_types"]
    # down_proj's rows are 256 long: Q3_K; up_proj (rows of 64) asked Q6_K, falls back to Q8_0
    assert types["model.layers.0.mlp.down_proj"] == "Q3_K"
    assert types["model.layers.0.mlp.up_proj"] == "Q8_0"
    assert types["model.layers.1.self_attn.q_proj"] == "Q4_0"
    layers = {s["name"]: s for s in json.loads((run_dir / "result.json").read_text())["layers"]}
    up = layers["model.layers.0.mlp.up_proj"]  # the fallback is recorded with what was asked
    assert up["gguf_type"] == "Q8_0" and up["gguf_fallback_from"] == "Q6_K"
    assert "gguf_fallback_from" not in layers["model.layers.0.mlp.down_proj"]
    for name, lin in read_source(run_dir).linears.items():
        t = GGUF_TYPES[types[name]]
        p = QuantParams(lin.scale.float(), lin.zero.float(), lin.offset.float())
        kquant_fields(p, t) if t.is_kquant else block_fields(p, t)  # storable as recorded
    ids = torch.randint(0, 300, (1, 16))
    assert torch.isfinite(neuqi.load(run_dir)(ids).logits).all()

    with pytest.raises(ValueError, match="give --gguf TYPE"):
        RunConfig(model=str(model), gguf_tensor="mlp.down_proj=Q2_K")
    with pytest.raises(ValueError, match="NAME=TYPE"):
        RunConfig(model=str(model), gguf="Q8_0", gguf_tensor="mlp.down_proj")
    with pytest.raises(ValueError, match="choose one of"):
        RunConfig(model=str(model), gguf="Q8_0", gguf_tensor="mlp.down_proj=Q7_K")
