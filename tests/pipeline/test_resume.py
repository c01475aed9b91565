"""Interrupted runs continue from their last finished layer and give the same checkpoint."""

import json

import pytest
from safetensors import safe_open

from neuqi.io_utils import atomic_write_json
from neuqi.pipeline import resume as resume_mod
from neuqi.pipeline import sequential
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model

from ..conftest import make_tiny_model


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama4", "llama", layers=4)


def config(model, calib, out, **kw) -> RunConfig:
    base = dict(model=str(model), bits=3, group_size=32, calib=str(calib), nsamples=4, seqlen=64,
                out_dir=str(out), device="cpu", batch_size=2)
    base.update(kw)
    return RunConfig(**base)


def interrupt_at(monkeypatch, layer: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
    """Make the run stop inside decoder layer ``layer`` (as Ctrl-C or a full disk would)."""
    real = sequential.quantize_linear

    def quantize_linear(lin, H, opts, name="", **kwargs):
        if f".{layer}." in name:
            raise exc("injected")
        return real(lin, H, opts, name, **kwargs)

    monkeypatch.setattr(sequential, "quantize_linear", quantize_linear)


def same_run(a, b) -> None:
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert [s["quant_loss"] for s in ra["layers"]] == [s["quant_loss"] for s in rb["layers"]]
    assert [s["name"] for s in ra["layers"]] == [s["name"] for s in rb["layers"]]


@pytest.mark.parametrize("low_memory", [False, True])
def test_a_run_interrupted_mid_layer_resumes_to_the_uninterrupted_checkpoint(
        four_layers, calib_file, tmp_path, monkeypatch, low_memory):
    whole = quantize_model(config(four_layers, calib_file, tmp_path / "a", low_memory=low_memory), quiet=True)
    cfg = config(four_layers, calib_file, tmp_path / "b", low_memory=low_memory)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(cfg, quiet=True)
    states = resume_mod.state_folder(cfg.out_dir, cfg.run_name)
    assert json.loads((states / "state.json").read_text())["layers_done"] == 2
    assert sorted(p.name for p in states.iterdir()) == [
        "hidden-00002.safetensors", "layer-00000.safetensors", "layer-00001.safetensors", "state.json"]
    assert not (tmp_path / "b" / cfg.run_name).exists()  # nothing that looks finished
    made = [json.loads(safe_open(states / f"layer-0000{i}.safetensors", "pt").metadata()["neuqi"])["seconds"]
            for i in (0, 1)]
    assert all(t > 0 for t in made)
    # the same command again is refused: it would throw the finished layers away
    with pytest.raises(FileExistsError, match="--resume"):
        quantize_model(cfg, quiet=True)
    # layers 0 and 1 are not quantized again
    done = []
    real = sequential.quantize_linear
    monkeypatch.setattr(sequential, "quantize_linear", lambda lin, H, opts, name="", **kw:
                        done.append(name) or real(lin, H, opts, name, **kw))
    resumed = quantize_model(config(four_layers, calib_file, tmp_path / "b", low_memory=low_memory,
                                    resume=True), quiet=True)
    assert {n.split(".")[2] for n in done} == {"2", "3"}
    same_run(whole, resumed)
    timing = json.loads((resumed / "result.json").read_text())["timing"]
    assert timing["resumed_at_layer"] == 2
    # the run's time counts the interrupted process's finished layers too
    assert timing["quantize_seconds_before_resume"] == pytest.approx(sum(made))
    assert timing["quantize_seconds"] == pytest.approx(timing["quantize_seconds_this_process"] + sum(made))
    assert timing["total_seconds"] >= timing["quantize_seconds"]
    assert not states.exists()  # a finished run leaves no state behind


def test_a_crash_between_the_saved_activations_and_the_commit_resumes_from_the_commit(
        four_layers, calib_file, tmp_path, monkeypatch):
    """state.json is written last: activations of a layer not yet committed are ignored."""
    whole = quantize_model(config(four_layers, calib_file, tmp_path / "a"), quiet=True)
    cfg = config(four_layers, calib_file, tmp_path / "b")
    writes = []

    def flaky_commit(path, obj):
        writes.append(obj["layers_done"])
        if len(writes) == 2:  # layer 1's files are written, its commit fails (disk full)
            raise OSError(28, "No space left on device")
        atomic_write_json(path, obj)

    with monkeypatch.context() as m:
        m.setattr(resume_mod, "atomic_write_json", flaky_commit)
        with pytest.raises(OSError, match="No space"):
            quantize_model(cfg, quiet=True)
    states = resume_mod.state_folder(cfg.out_dir, cfg.run_name)
    assert json.loads((states / "state.json").read_text())["layers_done"] == 1
    assert (states / "hidden-00002.safetensors").exists()  # written, never committed
    resumed = quantize_model(config(four_layers, calib_file, tmp_path / "b", resume=True), quiet=True)
    same_run(whole, resumed)


def test_a_saved_state_of_another_run_or_a_broken_one_is_refused(four_layers, calib_file, tmp_path,
                                                                monkeypatch):
    cfg = config(four_layers, calib_file, tmp_path)
    with monkeypatch.context() as m:
        interrupt_at(m, 1, RuntimeError)
        with pytest.raises(RuntimeError, match="injected"):
            quantize_model(cfg, quiet=True)
    states = resume_mod.state_folder(cfg.out_dir, cfg.run_name)
    saved = json.loads((states / "state.json").read_text())
    edited = {**saved, "fingerprint": {**saved["fingerprint"], "damp": 0.5}}
    (states / "state.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"another run \(differs in \['damp'\]\)"):
        quantize_model(config(four_layers, calib_file, tmp_path, resume=True), quiet=True)
    (states / "state.json").write_text(json.dumps(saved))
    (states / "hidden-00001.safetensors").unlink()  # the activations went missing
    with pytest.raises(ValueError, match=r"hidden-00001\.safetensors is unreadable"):
        quantize_model(config(four_layers, calib_file, tmp_path, resume=True), quiet=True)
    (states / "layer-00000.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"layer-00000\.safetensors is unreadable"):
        quantize_model(config(four_layers, calib_file, tmp_path, resume=True), quiet=True)
    # --overwrite starts over and finishes, leaving no state behind
    run = quantize_model(config(four_layers, calib_file, tmp_path, overwrite=True), quiet=True)
    assert (run / "model.safetensors").exists() and not states.exists()
    # --resume with nothing saved simply starts at layer 0
    fresh = quantize_model(config(four_layers, calib_file, tmp_path / "c", resume=True), quiet=True)
    same_run(run, fresh)


def test_a_state_saved_before_an_option_existed_resumes_when_the_option_is_at_its_default(
        four_layers, calib_file, tmp_path, monkeypatch):
    """Upgrading neuqi mid-run must not cost the finished layers: an option the saved
    fingerprint lacks counts as its default; set to anything else, the run is refused."""
    whole = quantize_model(config(four_layers, calib_file, tmp_path / "a"), quiet=True)
    cfg = config(four_layers, calib_file, tmp_path / "b")
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(cfg, quiet=True)
    states = resume_mod.state_folder(cfg.out_dir, cfg.run_name)
    saved = json.loads((states / "state.json").read_text())
    older = {k: v for k, v in saved["fingerprint"].items() if k not in ("fp_target", "search")}
    (states / "state.json").write_text(json.dumps({**saved, "fingerprint": older}))
    defaults = {"fp_target": False, "search": "auto"}
    with pytest.raises(ValueError, match=r"differs in \['fp_target'\]"):
        resume_mod.ResumeState.open(states, {**saved["fingerprint"], "fp_target": True}, True,
                                    defaults=defaults)
    resumed = quantize_model(config(four_layers, calib_file, tmp_path / "b", resume=True), quiet=True)
    same_run(whole, resumed)
