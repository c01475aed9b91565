"""`neuqi report` renders a table and plots from real (tiny) runs."""

import json

from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model
from neuqi.report import method_label, write_report

from .conftest import make_tiny_model


def test_report_from_two_runs(calib_file, tmp_path):
    model = make_tiny_model(tmp_path / "tiny", "llama")
    runs = []
    for bits, init in ((2, "minmax"), (3, "neuqi")):
        cfg = RunConfig(model=str(model), bits=bits, group_size=32, init=init, calib=str(calib_file),
                        nsamples=4, seqlen=64, out_dir=str(tmp_path / "runs"), device="cpu",
                        eval_sets=[str(calib_file)], eval_seqlen=64, eval_windows=2)
        runs.append(quantize_model(cfg, quiet=True))
    res_json = json.loads((runs[1] / "result.json").read_text())
    res_json["eval"]["zeroshot"] = {"tasks": {"t": {"acc": 0.61}}, "mean_acc": 0.61}
    (runs[1] / "result.json").write_text(json.dumps(res_json))
    out = tmp_path / "report"
    res = write_report([tmp_path / "runs"], out)
    assert res["rows"] == 2
    assert {"report.md", "ppl_vs_bits.png", "acc_vs_bits.png", "layer_loss.png"} <= set(res["files"])
    for f in res["files"]:
        assert (out / f).stat().st_size > 1000 or f == "report.md"
    md = (out / "report.md").read_text()
    for run in runs:
        r = json.loads((run / "result.json").read_text())
        assert f"{r['eval']['ppl'][str(calib_file)]['ppl']:.2f}" in md
        assert f"{r['timing']['quantize_seconds']:.0f}" in md
    assert "0.6100" in md and "NeUQI+LDLQ" in md and "LDLQ-minmax" in md


def test_method_labels():
    assert method_label({"method": "ldlq", "init": "neuqi"}) == "NeUQI+LDLQ"
    assert method_label({"method": "rtn", "init": "minmax"}) == "RTN-minmax"
    assert method_label({"method": "ldlq", "init": "minmax", "magr": True}) == "MagR+LDLQ-minmax"
    assert method_label({"method": "ldlq", "init": "neuqi_int", "descent": 3, "damp": 0.1}) == \
        "NeUQI_int+LDLQ cd3 damp0.1"
    assert method_label({"method": "ldlq", "init": "neuqi", "damp": 0.01}) == "NeUQI+LDLQ"
    assert method_label({"method": "ldlq", "init": "neuqi", "max_clip": 1.0}) == "NeUQI+LDLQ clip1"
    assert method_label({"method": "ldlq", "init": "neuqi", "max_clip": None}) == "NeUQI+LDLQ"
    assert method_label({"method": "fp", "bits": 16}) == "FP"
    # every option that changes the result is in the label, or two rows read the same
    assert method_label({"method": "ldlq", "init": "neuqi", "fp_target": 0.25}) == "NeUQI+LDLQ fp-target0.25"
    assert method_label({"method": "ldlq", "init": "neuqi", "search": "banded"}) == "NeUQI+LDLQ search-banded"
    defaults = {"method": "ldlq", "init": "neuqi", "search": "auto", "fp_target": 0.0}
    assert method_label(defaults) == "NeUQI+LDLQ"
