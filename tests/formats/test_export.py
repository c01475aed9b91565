"""Exports: every format re-read by an independent reference reader (bit for bit) and by
its consumer library (logits), on tiny random-initialised models."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuqi.formats.export import export_run
from neuqi.formats.export.verify import verify
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model

from ..conftest import make_tiny_model

pytest.importorskip("compressed_tensors")
pytest.importorskip("hqq")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Quantized tiny Qwen2 runs (bias in q/k/v): integer-zero 3-bit and float-zero 2-bit."""
    tmp = tmp_path_factory.mktemp("export")
    model = make_tiny_model(tmp / "tiny", "qwen2", intermediate=128)
    calib = tmp / "calib.txt"
    from ..conftest import SAMPLE_TEXT

    calib.write_text(SAMPLE_TEXT)
    out = {}
    for key, bits, init in (("int3", 3, "neuqi_int"), ("float2", 2, "neuqi"), ("int4", 4, "minmax")):
        cfg = RunConfig(model=str(model), bits=bits, group_size=32, init=init, calib=str(calib),
                        nsamples=4, seqlen=64, out_dir=str(tmp / "runs"), device="cpu")
        out[key] = quantize_model(cfg, quiet=True)
    return out


@pytest.mark.parametrize("fmt,run", [("compressed-tensors", "int3"), ("gptq", "int3"), ("hqq", "int3"),
                                     ("hqq", "float2"), ("compressed-tensors", "int4")])
def test_export_is_bit_exact_and_loads_in_the_consumer(runs, fmt, run, tmp_path):
    res = export_run(runs[run], fmt, tmp_path / "out")
    assert res["ok"] and res["tensors"]["bit_exact"] and res["tensors"]["linears"] == 14
    if fmt == "gptq":
        # GPTQModel needs torch>=2.14.1 (a CUDA build): checked where a GPU is lent, see README.
        assert "skipped" in res["engine"] or res["engine"]["ok"]
    else:
        assert res["engine"]["max_rel_logit_diff"] <= 1e-4 and res["engine"]["top1_agreement"] == 1.0
    assert json.loads((tmp_path / "out" / "neuqi_export.json").read_text())["format"] == fmt
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_gptq_v2_layout_and_config(runs, tmp_path):
    export_run(runs["int3"], "gptq", tmp_path / "g")
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is False
    t = load_file(tmp_path / "g" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert t[f"{q}.qweight"].shape == (64 // 32 * 3, 64) and t[f"{q}.qweight"].dtype == torch.int32
    assert t[f"{q}.qzeros"].shape == (2, 64 // 32 * 3) and t[f"{q}.scales"].dtype == torch.float16
    assert torch.equal(t[f"{q}.g_idx"], torch.arange(64, dtype=torch.int32) // 32)
    assert f"{q}.bias" in t


def test_gptq_v1_only_when_lossless(runs, tmp_path):
    # min-max zero-points of 0 are common (all-positive groups are rare, but zero 0 is the
    # clamp for groups whose minimum is ≥ 0); v1 must refuse when any occurs, else be exact.
    try:
        res = export_run(runs["int4"], "gptq", tmp_path / "v1", checkpoint_format="gptq")
    except ValueError as exc:
        assert "zero-points of 0" in str(exc)
        assert not (tmp_path / "v1").exists()
    else:
        assert res["tensors"]["bit_exact"]


def test_float_zero_points_are_refused_by_integer_formats(runs, tmp_path):
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(ValueError, match="neuqi_int"):
            export_run(runs["float2"], fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()


def test_a_damaged_export_fails_verification(runs, tmp_path):
    out = tmp_path / "ct"
    export_run(runs["int3"], "compressed-tensors", out)
    t = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight_scale"
    t[key] = t[key] * 1.5
    save_file(t, out / "model.safetensors")
    res = verify(out, runs["int3"])
    assert not res["ok"] and not res["tensors"]["bit_exact"] and not res["engine"]["ok"]


def test_failed_verification_writes_nothing_and_keeps_the_old_export(runs, tmp_path, monkeypatch):
    out = tmp_path / "h"
    export_run(runs["float2"], "hqq", out)
    before = (out / "qmodel.pt").read_bytes()
    import neuqi.formats.export as export_mod

    monkeypatch.setattr(export_mod, "verify", lambda *a, **k: {"ok": False, "engine": {"ok": False}})
    with pytest.raises(RuntimeError, match="failed verification"):
        export_run(runs["float2"], "hqq", out)
    assert (out / "qmodel.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["h"]


def test_unknown_format_and_bad_run_dir(runs, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(runs["int3"], "awq", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a neuqi checkpoint"):
        export_run(tmp_path, "hqq", tmp_path / "x")
