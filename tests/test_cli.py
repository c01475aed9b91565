"""The command line, driven as a user would (typer's runner)."""

import json

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
    run_dir = out / "tiny.calib.n4.L64.LDLQ.2bit.g32.Hsort.neuqi"
    res = runner.invoke(app, ["eval", str(run_dir), "--ppl", str(calib_file), "--seqlen", "64",
                              "--windows", "3", "--kl", str(model), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    ev = json.loads((run_dir / "result.json").read_text())["eval"]
    assert ev["ppl"][str(calib_file)]["windows"] == 3
    kl = ev["kl"][str(calib_file)]
    assert kl["kl"] > 0 and 0 <= kl["top1_agreement"] <= 1


def test_errors_are_one_clear_line_and_a_nonzero_exit(tmp_path):
    res = runner.invoke(app, ["quantize", str(tmp_path / "missing"), "-q"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["quantize", str(tmp_path), "--bits", "9", "-q"])
    assert res.exit_code == 2 and "bits" in res.output
