"""``neuqi quantize`` end to end: load, calibrate, quantize layer by layer, save, evaluate.

The run directory ``<out_dir>/<run_name>/`` is built under a hidden ``.partial``
name (the log is written there live) and renamed into place only when the
checkpoint and ``result.json`` are complete, so an interrupted run never leaves
something that looks finished; rerunning replaces it cleanly.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import neuqi
from neuqi.data.corpora import OFFLINE, consecutive_windows, load_text, sample_windows, tokenize
from neuqi.data.fetch import TEXT_VERSION
from neuqi.eval.perplexity import perplexity
from neuqi.formats.checkpoint import write_checkpoint
from neuqi.io_utils import atomic_write_json
from neuqi.memory import AnonPeak, peak_memory, reset_peak_memory
from neuqi.models.adapters import adapter_for
from neuqi.models.loading import load_model, load_tokenizer, resolve_model_path
from neuqi.pipeline.config import QuantConfig, RunConfig
from neuqi.pipeline.resume import ResumeState, state_folder, windows_digest
from neuqi.pipeline.sequential import capture_layer_inputs, quantize_layers
from neuqi.quant.init import warm_up

log = logging.getLogger("neuqi")


def progress_bar(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=quiet,
        transient=False,
    )


@contextmanager
def log_to_file(path: Path):
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(min(old_level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "neuqi": neuqi.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def calibration_windows(cfg: QuantConfig, tokenizer, text: str | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows sampled from ``cfg.calib`` (or from ``text``)."""
    ids = tokenize(load_text(cfg.calib, split="train") if text is None else text, tokenizer)
    return sample_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed)


def evaluate_sets(
    model, tokenizer, sets: list[str], seqlen: int, device: torch.device,
    max_windows: int | None = None, quiet: bool = True,
) -> dict:
    """Perplexity on each named set (or file); failures are reported per set."""
    results: dict[str, dict] = {}
    for name in sets:
        try:
            split = "test" if name == "wikitext2" else "validation" if name == "c4" else "train"
            ids = tokenize(load_text(name, split=split), tokenizer)
            if name == "c4":  # literature protocol: 256 random windows, seed 0
                windows = sample_windows(ids, max_windows or 256, seqlen, seed=0)
            else:
                windows = consecutive_windows(ids, seqlen, max_windows)
        except (RuntimeError, FileNotFoundError, ValueError) as exc:
            log.warning("eval set %s skipped: %s", name, exc)
            results[name] = {"error": str(exc)}
            continue
        with progress_bar(quiet) as bar:
            task = bar.add_task(f"ppl {name}", total=windows.shape[0], info="")
            results[name] = perplexity(model, windows, device, lambda t=task: bar.advance(t))
        if name in OFFLINE:  # so a later rebuild of the corpus is not mixed with old figures
            results[name]["corpus_build"] = TEXT_VERSION
        log.info("ppl %s: %.4f (%d windows)", name, results[name]["ppl"], windows.shape[0])
    return results


def quantize_model(cfg: RunConfig, quiet: bool = False) -> Path:
    """Run the whole job; returns the finished run directory.

    Unless ``cfg.save_state`` is off, every finished layer is saved (see
    ``neuqi.pipeline.resume``) and an interrupted run continues with ``cfg.resume``."""
    device = cfg.torch_device()
    dtype = cfg.torch_dtype()
    final = Path(cfg.out_dir) / cfg.run_name
    check_not_taken(final, cfg.overwrite)
    if cfg.resume and not cfg.save_state:
        raise ValueError("--resume needs the saved state: drop --no-save-state")
    if cfg.low_memory and resolve_model_path(cfg.model)[1] is not None:
        raise ValueError("--low-memory reads safetensors shards; convert the .gguf to a folder first")
    warm = _warm_up_search(cfg, device)  # compiles beside the loading and the first forward passes
    tokenizer = load_tokenizer(cfg.model)
    windows = calibration_windows(cfg, tokenizer)
    resume = open_state(cfg, windows)  # refuses to drop a saved state silently
    try:
        with run_directory(final, cfg.overwrite) as work:
            with log_to_file(work / "quantize.log"):
                result = _quantize_into(cfg, work, device, dtype, quiet, tokenizer, windows,
                                        resume if cfg.save_state else None)
            atomic_write_json(work / "result.json", result)
    except BaseException:
        if cfg.save_state and resume.layers_done:
            log.error("run stopped after %d layers; its state is in %s: rerun the same command "
                      "with --resume to continue", resume.layers_done, resume.folder)
        raise
    resume.finish()
    if warm is not None:
        warm.join()  # long done: the first search waited for it
    return final


def _warm_up_search(cfg: QuantConfig, device: torch.device):
    """The background compilation of the run's parameter search
    (:func:`neuqi.quant.init.warm_up`), or None.  GGUF types choose their parameters
    with searches of their own, so they get none; channel-wise rows of any length
    ≥ 256 take the same kernels, so a row of 512 stands for the model's."""
    if cfg.gguf is not None:
        return None
    return warm_up(512, cfg.spec, cfg.init, max_clip=cfg.max_clip,  # type: ignore[arg-type]
                   norm=cfg.init_norm, search=cfg.neuqi_search, device=device)


def open_state(cfg: RunConfig, windows: torch.Tensor) -> ResumeState:
    """The run's saved state (``cfg.resume``) or a new one; see ``neuqi.pipeline.resume``."""
    quant = {f.name: getattr(cfg, f.name) for f in fields(QuantConfig)}
    fingerprint = json.loads(json.dumps({
        **quant, "model": str(resolve_model_path(cfg.model)[0].resolve()), "run_name": cfg.run_name,
        "dtype": str(cfg.torch_dtype()), "calibration_tokens": windows_digest(windows)}, default=str))
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(QuantConfig)
                                      if f.default is not MISSING}, default=str))
    return ResumeState.open(state_folder(cfg.out_dir, cfg.run_name), fingerprint, cfg.resume,
                            cfg.overwrite, defaults)


def check_not_taken(final: Path, overwrite: bool) -> None:
    """An existing run folder is an error unless ``overwrite``; callers check before
    the work too, so that a name clash costs nothing."""
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"{final} already exists; pass --overwrite (API: overwrite=True) to replace it, "
            f"or choose another --out-dir")


@contextmanager
def run_directory(final: Path, overwrite: bool = False):
    """Yield a hidden work folder that becomes ``final`` only if the block succeeds.

    An existing ``final`` is an error unless ``overwrite`` (then it is replaced,
    still atomically): a run of the same name may be hours of work.
    """
    check_not_taken(final, overwrite)
    out_root = final.parent
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / ".neuqi-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output directory {out_root} is not writable: {exc}") from None
    work = out_root / f".{final.name}.partial"
    if work.exists():
        shutil.rmtree(work)  # left by an interrupted run
    work.mkdir(parents=True)
    try:
        yield work
        if final.exists():
            old = out_root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            work.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def check_finite_model(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"the model's {name} holds NaN/inf values; refusing to quantize it")


def calibrate_and_quantize(
    cfg: QuantConfig, model, tokenizer, device: torch.device, quiet: bool = True,
    before_layer=None, after_layer=None, windows: torch.Tensor | None = None,
    home: torch.device | str = "cpu", resume: ResumeState | None = None,
) -> tuple[dict, list[dict], dict]:
    """Quantize ``model`` in place (weights become de-quantized ones).

    Returns ``(records, per-linear stats, timing)``; ``records`` feed the checkpoint.
    ``windows: [n, seqlen]`` token ids replace sampling ``cfg.calib``;
    ``before_layer``/``after_layer`` are passed to ``quantize_layers`` (lazy loading);
    ``home`` is where the model's modules live between their turns on ``device``;
    ``resume`` saves each layer and skips those an interrupted run finished.
    """
    adapter = adapter_for(model.config.model_type)
    if before_layer is None:
        check_finite_model(model)
    t0 = time.perf_counter()
    if windows is None:
        windows = calibration_windows(cfg, tokenizer)
    batches = capture_layer_inputs(model, adapter, windows, cfg.batch_size, device, home)
    t_capture = time.perf_counter() - t0
    n_layers = len(model.get_submodule(adapter.layers))
    with progress_bar(quiet) as bar:
        what = cfg.gguf or f"{cfg.bits}-bit"
        task = bar.add_task(f"quantize {what}", total=n_layers, info="")

        def on_layer(i: int, total: int, summary: dict) -> None:
            bar.update(task, advance=1, info=f"layer {i}: {summary['seconds']:.1f}s")
            log.info("layer %d/%d done in %.1fs (loss %.4g)", i + 1, total,
                     summary["seconds"], summary["quant_loss"])

        t0 = time.perf_counter()
        if resume is not None and resume.layers_done:
            bar.update(task, advance=resume.layers_done, info=f"resumed after layer {resume.layers_done - 1}")
        opts = cfg
        if cfg.is_gguf_mix:  # a llama.cpp mix: spelled out per linear for this model
            linears = {n: m.in_features for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n.startswith(adapter.layers + ".")}
            opts = cfg.quant_options().resolve_gguf_mix(linears, model.config)
        records, stats = quantize_layers(model, adapter, batches, opts, device, on_layer,
                                         before_layer, after_layer, home, resume)
        t_quant = time.perf_counter() - t0
    timing = {
        "capture_seconds": t_capture,
        "quantize_seconds": t_quant,
        "init_seconds": sum(s["seconds_init"] for s in stats),
        "solve_seconds": sum(s["seconds_solve"] for s in stats),
        "magr_seconds": sum(s["seconds_magr"] for s in stats),
    }
    return records, stats, timing


def _quantize_into(cfg: RunConfig, work: Path, device, dtype, quiet: bool, tokenizer,
                   windows: torch.Tensor, resume: ResumeState | None) -> dict:
    t_start = time.perf_counter()
    log.info("run %s on %s (%s)", cfg.run_name, device, dtype)
    reset_peak_memory(device)
    state = None
    with AnonPeak() as anon:
        if cfg.low_memory:
            model, state, hooks = _lazy_model(cfg, dtype)
            records, stats, timing = calibrate_and_quantize(cfg, model, tokenizer, device, quiet, *hooks,
                                                            windows=windows, resume=resume)
        else:
            model = load_model(cfg.model, dtype)
            records, stats, timing = calibrate_and_quantize(cfg, model, tokenizer, device, quiet,
                                                            windows=windows, resume=resume)
        if resume is not None and resume.resumed_from:
            # quantize_seconds: this process's layers plus the restored layers' recorded time
            timing["resumed_at_layer"] = resume.resumed_from
            timing["quantize_seconds_this_process"] = timing["quantize_seconds"]
            before = resume.seconds_before
            timing["quantize_seconds_before_resume"] = before
            if before is not None:
                timing["quantize_seconds"] += before

        run_info = {"config": cfg.to_dict(), "environment": environment(device)}
        write_checkpoint(model, records, cfg.spec, cfg.zero_point, cfg.act_order, work, tokenizer,
                         run_info, state=state,
                         gguf_type=None if cfg.gguf is None else cfg.gguf_type.name,
                         gguf_mix=cfg.gguf if cfg.is_gguf_mix else None)
    if cfg.low_memory and cfg.eval_sets:
        from neuqi.formats.checkpoint import load_quantized

        model = load_quantized(work, dtype=dtype)  # compact: codes stay packed
    result = run_result(run_info, cfg.run_name, stats, timing, work,
                        {**peak_memory(device), "peak_anon_mb": anon.peak_mb})
    if cfg.eval_sets:
        result["eval"]["ppl"] = evaluate_sets(model, tokenizer, cfg.eval_sets, cfg.eval_seqlen,
                                              device, cfg.eval_windows, quiet)
        model.to("cpu")
    # like quantize_seconds, a resumed run's total counts the interrupted process's layers
    result["timing"]["total_seconds"] = (time.perf_counter() - t_start
                                         + (timing.get("quantize_seconds_before_resume") or 0.0))
    log.info("quantized %d linears in %.1fs", len(stats), timing["quantize_seconds"])
    return result


def run_result(run_info: dict, run_name: str, stats: list[dict], timing: dict, work: Path,
               memory: dict) -> dict:
    """``result.json`` of a finished quantization (``eval`` filled in later)."""
    return {
        **run_info,
        "run_name": run_name,
        "timing": timing,
        "totals": {
            "quant_loss": sum(s["quant_loss"] for s in stats),
            "diag_loss": sum(s["diag_loss"] for s in stats),
            "linears": len(stats),
        },
        "layers": stats,
        "checkpoint_bytes": sum(f.stat().st_size for f in work.glob("*.safetensors")),
        "memory": memory,
        "eval": {},
    }


def _lazy_model(cfg: RunConfig, dtype: torch.dtype):
    """An empty model plus the hooks that read each layer from disk just in time."""
    from neuqi.models.lazy import ShardedCheckpoint, empty_model, load_top_level, materialize, release
    folder, _ = resolve_model_path(cfg.model)
    ckpt = ShardedCheckpoint(folder)
    model = empty_model(folder, dtype)
    adapter = adapter_for(model.config.model_type)
    if adapter.experts is not None:
        raise ValueError("--low-memory does not read mixture-of-experts checkpoints yet (their experts "
                         "are stored per expert and fused on load); run without it")
    load_top_level(model, adapter, ckpt, dtype)
    state = {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}
    quantized = set(adapter.linears)

    def before(i: int, layer) -> None:
        materialize(layer, f"{adapter.layers}.{i}.", ckpt, dtype)

    def after(i: int, layer) -> None:
        for name, p in layer.named_parameters():
            if name.rpartition(".")[0] not in quantized:
                state[f"{adapter.layers}.{i}.{name}"] = p.detach().clone()
        release(layer)

    return model, state, (before, after)


def read_result(run_dir: Path) -> dict:
    path = Path(run_dir) / "result.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no result.json (not a finished neuqi run)")
    return json.loads(path.read_text())
