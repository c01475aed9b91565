"""``--fp-target``: the solver's target absorbs the earlier layers' error."""

import pytest
import torch

from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import calibration_windows, quantize_model

from ..conftest import make_tiny_model
from .test_resume import interrupt_at, same_run


def config(model, calib, out, **kw) -> RunConfig:
    base = dict(model=str(model), bits=2, group_size=32, calib=str(calib), nsamples=8, seqlen=64,
                out_dir=str(out), device="cpu", batch_size=2, init="minmax")
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama4", "llama", layers=4)


def _output_error(run, fp_model, windows) -> float:
    q = load_model(run)
    with torch.no_grad():
        return float(((q(windows).logits - fp_model(windows).logits) ** 2).mean())


def test_the_fp_target_brings_the_model_closer_to_fp_on_its_calibration(four_layers, calib_file, tmp_path):
    plain = quantize_model(config(four_layers, calib_file, tmp_path), quiet=True)
    cfg = config(four_layers, calib_file, tmp_path, fp_target=1.0)
    assert cfg.run_name.endswith(".fptarget1")
    target = quantize_model(cfg, quiet=True)
    windows = calibration_windows(cfg, load_tokenizer(four_layers))
    fp = load_model(four_layers)
    # what each run's last layer was asked to match: the FP model, not its own input's image
    assert _output_error(target, fp, windows) < 0.9 * _output_error(plain, fp, windows)


def test_the_fp_target_strength_is_checked():
    with pytest.raises(ValueError, match=r"--fp-target takes ALPHA in \[0, 1\]"):
        RunConfig(model="m", fp_target=1.5)


def test_an_interrupted_fp_target_run_resumes_to_the_uninterrupted_checkpoint(
        four_layers, calib_file, tmp_path, monkeypatch):
    """The FP hidden states are not saved: the resumed run recomputes them from the FP
    layers before it restores the finished ones."""
    whole = quantize_model(config(four_layers, calib_file, tmp_path / "a", fp_target=0.25), quiet=True)
    cfg = config(four_layers, calib_file, tmp_path / "b", fp_target=0.25)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(cfg, quiet=True)
    resumed = quantize_model(config(four_layers, calib_file, tmp_path / "b", fp_target=0.25, resume=True),
                             quiet=True)
    same_run(whole, resumed)
