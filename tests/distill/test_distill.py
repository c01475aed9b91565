"""Light distillation on a tiny random-initialised model."""

import json

import pytest
import torch
import torch.nn.functional as F

import neuqi
from neuqi.distill import DistillConfig, distill_run, trainer
from neuqi.distill.student import make_student, quant_linears
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model
from neuqi.quant.grid import QuantParams

from ..conftest import make_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ..conftest import SAMPLE_TEXT

    tmp = tmp_path_factory.mktemp("distill")
    model = make_tiny_model(tmp / "tiny", "llama")
    calib = tmp / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    runs = {}
    for init in ("neuqi", "neuqi_int"):
        cfg = RunConfig(model=str(model), bits=2, group_size=32, init=init, calib=str(calib), nsamples=4,
                        seqlen=64, out_dir=str(tmp / "runs"), device="cpu")
        runs[init] = quantize_model(cfg, quiet=True)
    return tmp, model, calib, runs


def _hidden_mse(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(F.mse_loss(student.model(input_ids=ids).last_hidden_state,
                                teacher.model(input_ids=ids).last_hidden_state))


def test_distillation_lowers_the_teacher_student_loss_and_keeps_codes(setup):
    _, model, calib, runs = setup
    cfg = DistillConfig(run=str(runs["neuqi"]), teacher=str(model), data=str(calib), nsamples=16, seqlen=64,
                        epochs=3, lr=1e-3, eval_sets=[str(calib)], eval_windows=2, save_every=0)
    out = distill_run(cfg, quiet=True)
    teacher = load_model(model)
    from neuqi.data.corpora import consecutive_windows, load_text, tokenize

    ids = consecutive_windows(tokenize(load_text(str(calib)), load_tokenizer(model)), 64, 8)  # training text
    before, after = neuqi.load(runs["neuqi"]), neuqi.load(out)
    assert _hidden_mse(after, teacher, ids) < 0.8 * _hidden_mse(before, teacher, ids)
    for name, q in quant_linears(before).items():
        q2 = quant_linears(after)[name]
        assert torch.equal(q.codes(), q2.codes())  # integer codes frozen
        assert not torch.equal(q.scales, q2.scales)  # scales trained
        assert (q2.scales > 0).all()
    res = json.loads((out / "result.json").read_text())
    assert res["config"]["distilled"]["nsamples"] == 16 and res["distill"]["steps"] == 48
    # round trip: the saved checkpoint (fp16 scales/zeros) reproduces the in-memory result
    from neuqi.pipeline.run import evaluate_sets

    ppl = evaluate_sets(after, load_tokenizer(model), [str(calib)], 2048, torch.device("cpu"), 2)
    assert ppl[str(calib)]["ppl"] == pytest.approx(res["eval"]["ppl"][str(calib)]["ppl"], rel=1e-3)
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_integer_zero_points_stay_integers_unless_free_zero(setup):
    _, _, _, runs = setup
    student = neuqi.load(runs["neuqi_int"])
    trainable = {id(p) for p in make_student(student, free_zero=False)}
    for q in quant_linears(student).values():
        assert id(q.scales) in trainable and "qzeros" in q._buffers
    student = neuqi.load(runs["neuqi_int"])
    make_student(student, free_zero=True)
    q = next(iter(quant_linears(student).values()))
    assert q.zero_point == "float" and q.zeros.requires_grad
    assert not student.model.embed_tokens.weight.requires_grad


def test_resume_continues_from_the_saved_state(setup, monkeypatch):
    tmp, model, calib, runs = setup
    cfg = DistillConfig(run=str(runs["neuqi_int"]), teacher=str(model), data=str(calib), nsamples=12,
                        seqlen=64, lr=1e-3, eval_sets=[], save_every=4, out_dir=str(tmp / "d"))

    real = trainer.distill_loss
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "distill_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill_run(cfg, quiet=True)
    assert not (tmp / "d" / cfg.run_name()).exists()  # nothing half-written
    assert (tmp / "d" / f".{cfg.run_name()}.state.pt").exists()
    calls["n"] = -1000
    out = distill_run(cfg, quiet=True, resume=True)
    res = json.loads((out / "result.json").read_text())
    assert [c["step"] for c in res["distill"]["curve"]] == list(range(1, 13))
    assert calls["n"] == -1000 + 8  # steps 5..12 only
    assert not (tmp / "d" / f".{cfg.run_name()}.state.pt").exists()


LR, STEPS = trainer.GGUF_LR, 48  # the default rate of a GGUF run
# Adam moves a parameter by at most ~lr per step: 2x that over every step (the schedule's
# warm-up and decay move less), plus fp16's rounding.
MAX_MOVE = 2 * LR * STEPS + 1e-3


@pytest.mark.parametrize("types", [("Q4_0", "mlp.down_proj=Q4_1"),
                                   ("Q8_0", "mlp.down_proj=Q2_K,self_attn.o_proj=Q3_K")])
def test_a_gguf_run_distils_on_its_types_lattice(tmp_path, types):
    """Distillation trains only the floats a GGUF type stores: the codes and every
    integer stay, the steps/offsets land on the type (fp16; k-quants d·k and dmin·m
    with the same integers), the export's factorisation accepts them, and the student
    ends nearer the teacher at one learning rate for every type, each ``d`` moved by no
    more than the relative rate allows (the tiny model's steps are ~0.005: trained in
    weight units at this rate, they ran away)."""
    from neuqi.quant.gguf_types import gguf_type
    from neuqi.quant.kquants import kquant_fields

    from ..conftest import SAMPLE_TEXT

    model = make_tiny_model(tmp_path / "tiny", "llama", hidden=256, intermediate=512)
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    base, over = types
    cfg = RunConfig(model=str(model), gguf=base, gguf_tensor=over, method="ldlq",
                    calib=str(calib), nsamples=4, seqlen=64, out_dir=str(tmp_path / "runs"), device="cpu")
    run = quantize_model(cfg, quiet=True)
    out = distill_run(DistillConfig(run=str(run), teacher=str(model), data=str(calib), nsamples=16, seqlen=64,
                                    epochs=3, eval_sets=[], save_every=0), quiet=True)
    assert json.loads((out / "result.json").read_text())["config"]["distilled"]["lr"] == LR
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["zero_point"] == "offset" and qc["gguf_type"] == base
    for entry in over.split(","):
        name, ty = entry.split("=")
        assert qc["gguf_types"][f"model.layers.0.{name}"] == ty
    from neuqi.data.corpora import consecutive_windows, load_text, tokenize

    ids = consecutive_windows(tokenize(load_text(str(calib)), load_tokenizer(model)), 64, 8)
    before, after = neuqi.load(run), neuqi.load(out)
    teacher = load_model(model)
    assert _hidden_mse(after, teacher, ids) < 0.9 * _hidden_mse(before, teacher, ids)
    moved = 0
    for name, q in quant_linears(before).items():
        q2 = quant_linears(after)[name]
        t = gguf_type(qc["gguf_types"][name])
        assert torch.equal(q.codes(), q2.codes())
        s, o = q2.scales.t().float(), q2.offsets.t().float()
        if t.is_kquant:
            f0 = kquant_fields(QuantParams(q.scales.t(), -q.offsets.t() / q.scales.t(), q.offsets.t()), t)
            f1 = kquant_fields(QuantParams(s, -o / s, o), t)  # raises unless on the lattice
            assert torch.equal(f0.k, f1.k) and torch.equal(f0.m, f1.m) and torch.equal(f0.flip, f1.flip)
            moved += int(not torch.equal(f0.d, f1.d))
            assert bool(((f1.d / f0.d - 1).abs() <= MAX_MOVE).all())
        else:
            assert torch.equal(s, s.half().float())  # fp16 steps (and offsets)
            assert not t.asymmetric or torch.equal(o, o.half().float())
            if not t.asymmetric:  # the zero stays c or c − 1
                z = -o / s
                assert bool(((z == t.centre) | (z == t.centre - 1)).all())
            moved += int(not torch.equal(s, q.scales.t().float()))
            assert bool(((s / q.scales.t().float() - 1).abs() <= MAX_MOVE).all())
    assert moved == len(quant_linears(before))  # every linear trained


def test_a_gguf_run_refuses_free_zero(setup):
    tmp, model, calib, _ = setup
    cfg = RunConfig(model=str(model), gguf="Q4_0", method="rtn", calib=str(calib), nsamples=2, seqlen=32,
                    out_dir=str(tmp / "runs"), device="cpu")
    run = quantize_model(cfg, quiet=True)
    with pytest.raises(ValueError, match="without --free-zero"):
        distill_run(DistillConfig(run=str(run), teacher=str(model), data=str(calib), nsamples=2, seqlen=32,
                                  free_zero=True), quiet=True)
