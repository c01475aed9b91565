"""``neuqi distill``: train a quantized run's scales, zero-points, norms and biases so
its final hidden states match the FP teacher's (NEUQI_NOTES "Light distillation").
A GGUF run trains only the floats its type stores (``neuqi.distill.student``), so the
distilled run exports to the same GGUF type.

Single process on CPU or one GPU by default; ``accelerate launch -m neuqi.cli distill``
runs data-parallel (DDP) with the same code. The new run directory is built under a
hidden name and renamed when complete; the training state is saved every
``save_every`` steps so ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from neuqi.data.corpora import load_text, sample_windows, tokenize
from neuqi.distill.student import keep_scales_positive, make_student, records, round_to_types
from neuqi.io_utils import atomic_dir, atomic_path, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    run: str
    teacher: str
    data: str = "c4-sample"
    nsamples: int = 256
    seqlen: int = 2048
    epochs: int = 1
    lr: float | None = None  # None: GRID_LR, or GGUF_LR for a GGUF run
    warmup: float = 0.1
    batch_size: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    loss: str = "mse"  # mse on final hidden states | kl on logits
    free_zero: bool = False
    grad_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU
    seed: int = 0
    out_dir: str | None = None  # default: beside the source run
    eval_sets: list[str] = field(default_factory=lambda: ["wiki-sample", "austen-test", "brown"])
    eval_windows: int | None = 8
    save_every: int = 50

    def run_name(self) -> str:
        name = Path(self.run).resolve().name
        tag = f".distill.n{self.nsamples}.L{self.seqlen}" + (".freezero" if self.free_zero else "")
        return name + tag


# The paper's rate for scales and zero-points trained in weight units (and for norms).
GRID_LR = 3e-4
# A GGUF run's factors train relative to their start (neuqi.distill.student): an optimizer
# step moves each by about this fraction of itself.  Measured with the KL loss on 64 × 256
# tokens (2026-12-07): SmolLM2-135M Q4_0, llama.cpp's KL to F32 0.130 → 0.118 and
# wiki-sample 24.43 → 23.63 (docs/results/gguf-smollm2-135m.md).
GGUF_LR = 1e-3


def _teacher_output(teacher, ids, loss: str):
    with torch.no_grad():
        if loss == "kl":
            return teacher(input_ids=ids).logits.float()
        return teacher.model(input_ids=ids).last_hidden_state.float()


def distill_loss(student, target, ids, loss: str) -> torch.Tensor:
    if loss == "kl":
        logits = student(input_ids=ids).logits.float()
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                        reduction="batchmean") / ids.shape[1]
    hidden = student.model(input_ids=ids).last_hidden_state.float()
    return F.mse_loss(hidden, target)


def distill_run(cfg: DistillConfig, quiet: bool = False, resume: bool = False) -> Path:
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from neuqi.formats.checkpoint import load_quantized, write_checkpoint
    from neuqi.memory import peak_memory, reset_peak_memory
    from neuqi.models.loading import load_model, load_tokenizer
    from neuqi.pipeline.config import resolve_device
    from neuqi.pipeline.run import environment, evaluate_sets, progress_bar
    from neuqi.quant.grid import QuantSpec
    from neuqi.report import plot_loss_curve

    if cfg.loss not in ("mse", "kl"):
        raise ValueError(f"--loss must be mse or kl, got {cfg.loss!r}")
    if cfg.nsamples < 1 or cfg.seqlen < 8 or cfg.epochs < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("nsamples, epochs, batch size and grad-accum must be ≥ 1 and seqlen ≥ 8")
    src = Path(cfg.run)
    src_result = src / "result.json"
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} is not a neuqi run folder (config.json missing)")
    device = resolve_device(cfg.device)
    reset_peak_memory(device)
    use_bf16 = device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if use_bf16 else "no",
                      gradient_accumulation_steps=cfg.grad_accum)
    torch.manual_seed(cfg.seed)
    out_root = Path(cfg.out_dir) if cfg.out_dir else src.parent
    final = out_root / cfg.run_name()
    state_path = out_root / f".{cfg.run_name()}.state.pt"

    student = load_quantized(src, dtype=torch.float32)
    qc = dict(student.quantization_config)
    if cfg.lr is None:
        cfg = replace(cfg, lr=GGUF_LR if qc.get("zero_point") == "offset" else GRID_LR)
    if cfg.free_zero and qc.get("zero_point") == "offset":
        raise ValueError(f"{src.name} was quantized for GGUF {qc.get('gguf_type')}: its zero-points are "
                         "what the type stores; distill it without --free-zero")
    if qc.get("experts"):  # the student trains QuantLinear parameters only
        raise ValueError(f"{src.name} has quantized mixture-of-experts weights; distilling them is not "
                         "supported yet")
    tokenizer = load_tokenizer(cfg.teacher)
    teacher = load_model(cfg.teacher, torch.float32).eval()
    windows = sample_windows(tokenize(load_text(cfg.data), tokenizer), cfg.nsamples, cfg.seqlen, cfg.seed)

    before = {}
    if cfg.eval_sets:
        before = evaluate_sets(student, tokenizer, cfg.eval_sets, 2048, device, cfg.eval_windows, quiet)
        student.to("cpu")
    trainable = make_student(student, cfg.free_zero)
    if cfg.grad_checkpointing:
        student.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = math.ceil(cfg.nsamples / cfg.batch_size) * cfg.epochs // cfg.grad_accum or 1
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup * steps), steps)
    loader = torch.utils.data.DataLoader(windows, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    student, opt, loader, sched = acc.prepare(student, opt, loader, sched)
    teacher.to(acc.device)

    curve: list[dict] = []
    start_step = 0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        acc.unwrap_model(student).load_state_dict(state["student"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        curve, start_step = state["curve"], state["step"]
        log.info("resuming %s at step %d/%d", final.name, start_step, steps)

    student.train()
    t0 = time.perf_counter()
    tokens = 0
    step = start_step
    micro = 0
    with progress_bar(quiet) as bar:
        task = bar.add_task("distill", total=steps, completed=start_step, info="")
        for _epoch in range(cfg.epochs):
            for ids in loader:
                micro += 1
                if micro <= start_step * cfg.grad_accum:  # resumed: skip what was trained
                    continue
                with acc.accumulate(student):
                    target = _teacher_output(teacher, ids, cfg.loss)
                    loss = distill_loss(student, target, ids, cfg.loss)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(trainable, cfg.grad_clip)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                tokens += ids.numel()
                if not acc.sync_gradients:
                    continue
                keep_scales_positive(acc.unwrap_model(student))  # only after a real optimizer step
                step += 1
                curve.append({"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]})
                rate = tokens / (time.perf_counter() - t0)
                bar.update(task, completed=step, info=f"loss {curve[-1]['loss']:.4g} · {rate:.0f} tok/s")
                if cfg.save_every and step % cfg.save_every == 0 and step < steps and acc.is_main_process:
                    _save_state(state_path, acc.unwrap_model(student), trainable, opt, sched, curve, step)
    seconds = time.perf_counter() - t0
    student = acc.unwrap_model(student).eval()
    if not acc.is_main_process:
        return final

    round_to_types(student)  # a GGUF run: evaluate what its file will store
    after = {}
    if cfg.eval_sets:
        after = evaluate_sets(student, tokenizer, cfg.eval_sets, 2048, device, cfg.eval_windows, quiet)
    recs = records(student)
    zero_point = qc["zero_point"] if qc["zero_point"] == "offset" else (
        "float" if (qc["zero_point"] == "float" or cfg.free_zero) else "int")
    spec = QuantSpec(qc["bits"], qc["group_size"])
    skip = set(recs)
    state = {k: v for k, v in student.state_dict().items() if k.rsplit(".", 1)[0] not in skip}
    src_res = json.loads(src_result.read_text()) if src_result.exists() else {}
    result = {
        "config": {**src_res.get("config", {}), "distilled": asdict(cfg), "run_name": final.name},
        "source_run": str(src),
        "environment": environment(device),
        "run_name": final.name,
        "timing": {**src_res.get("timing", {}), "distill_seconds": seconds},
        "distill": {"steps": len(curve) and curve[-1]["step"], "tokens": tokens, "curve": curve,
                    "tokens_per_second": tokens / seconds if seconds else None},
        "layers": src_res.get("layers", []),
        "eval": {"ppl": after, "ppl_before": before},
        "memory": peak_memory(device),
    }
    with atomic_dir(final) as work:
        write_checkpoint(student.cpu(), recs, spec, zero_point, qc.get("act_order", True), work, tokenizer,
                         {"config": result["config"]}, state=state, gguf_type=qc.get("gguf_type"),
                         gguf_mix=qc.get("gguf_mix"))
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in work.glob("*.safetensors"))
        atomic_write_json(work / "result.json", result)
        try:
            plot_loss_curve(curve, work / "loss_curve.png", final.name)
        except RuntimeError as exc:  # matplotlib not installed: the run is complete without it
            log.warning("no loss_curve.png: %s", exc)
    state_path.unlink(missing_ok=True)
    return final


def _save_state(path: Path, student, trainable, opt, sched, curve, step) -> None:
    keep = {id(p) for p in trainable}
    params = {k: v.detach().cpu() for k, v in student.named_parameters() if id(v) in keep}
    with atomic_path(path) as tmp:
        torch.save({"student": params, "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "curve": curve, "step": step}, tmp)
