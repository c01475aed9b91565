"""The Python API: quantize a transformers model that is already in memory.

``neuqi quantize`` loads a model from disk, quantizes it and saves a run; this
is the same pipeline for a model a user already holds (fetched with the hub's
own tools, fine-tuned, patched): it is quantized where it lives, its linears
are swapped for ``QuantLinear`` layers that keep the packed codes, and it can
be saved as a run that ``neuqi eval | distill | export`` take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from neuqi.formats.checkpoint import QuantizedLinear, packed_state, quantization_config, write_checkpoint
from neuqi.formats.qlinear import replace_experts, replace_linears
from neuqi.io_utils import atomic_write_json
from neuqi.memory import AnonPeak, peak_memory, reset_peak_memory
from neuqi.pipeline.config import QuantConfig, resolve_device, short_model_name
from neuqi.pipeline.run import (
    calibrate_and_quantize,
    calibration_windows,
    check_not_taken,
    environment,
    run_directory,
    run_result,
)

log = logging.getLogger("neuqi")

Calibration = str | Path | Sequence[str] | Tensor


def quantize(
    model: nn.Module,
    tokenizer=None,
    calib: Calibration | None = None,
    *,
    save: str | Path | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    quiet: bool = True,
    config: QuantConfig | None = None,
    **options,
) -> nn.Module:
    """Quantize ``model`` in place and return it, its linears now ``QuantLinear``.

    ``calib`` is a corpus name or text file (sampled as ``nsamples × seqlen``
    windows with ``seed``; default: the options' ``calib``, c4-sample), a list of
    texts (joined, then sampled the same way), or token ids ``[n, seqlen]`` used
    as given. ``options`` are ``QuantConfig``'s
    fields (``bits=3, group_size=64, init="neuqi_int", gguf="Q4_0", ...``), or pass
    ``config``. The model stays on its device; each decoder layer visits ``device``
    (default: CUDA when there is one) for its turn. ``save`` also writes a run
    folder (checkpoint, ``result.json``) atomically; an existing folder is an error
    unless ``overwrite``.
    """
    quant = _options(config, options, calib)
    if save is not None:
        check_not_taken(Path(save), overwrite)  # before hours of work
    home = _model_device(model)
    work = _work_device(device, home)
    windows = _calibration(quant, calib, tokenizer)
    if windows is not None:
        quant = replace(quant, nsamples=windows.shape[0], seqlen=windows.shape[1])
    t0 = time.perf_counter()
    reset_peak_memory(work)
    with AnonPeak() as anon:
        records, stats, timing = calibrate_and_quantize(quant, model, tokenizer, work, quiet,
                                                        windows=windows, home=home)
    if save is not None:
        _save_run(Path(save), model, tokenizer, records, quant, stats, timing, work, anon.peak_mb,
                  overwrite)
    _swap_in_quantlinears(model, records, quant)
    log.info("quantized %d linears in %.1fs", len(records), time.perf_counter() - t0)
    return model


def _options(config: QuantConfig | None, options: dict, calib: Calibration | None) -> QuantConfig:
    if config is not None and options:
        raise ValueError("pass either config=QuantConfig(...) or keyword options, not both")
    if config is None:
        unknown = sorted(set(options) - set(QuantConfig.option_names()))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; "
                             f"QuantConfig takes {', '.join(QuantConfig.option_names())}")
        config = QuantConfig(**options)
    else:
        config = config.quant_options()
    if calib is None:
        return config
    if isinstance(calib, (str, Path)):
        return replace(config, calib=str(calib))
    return replace(config, calib="tokens" if isinstance(calib, Tensor) else "texts")


def _calibration(quant: QuantConfig, calib: Calibration | None, tokenizer) -> Tensor | None:
    """Token windows ``[n, seqlen]`` for in-memory calibration; ``None`` for a named corpus."""
    if isinstance(calib, Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.int32, torch.int64) or min(calib.shape) < 1:
            raise ValueError(f"calib token ids must be an integer [n, seqlen] tensor, got "
                             f"{calib.dtype} {tuple(calib.shape)}")
        return calib.long().cpu()
    if tokenizer is None:
        raise ValueError("calibration text needs the model's tokenizer: quantize(model, tokenizer, ...)")
    if calib is None or isinstance(calib, (str, Path)):
        return None
    texts = list(calib)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("calib must be a corpus name, a text file, a list of texts or token ids")
    return calibration_windows(quant, tokenizer, text="\n\n".join(texts))


def _model_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if any(d.type == "meta" for d in devices):
        raise ValueError("the model has parameters on the meta device (not loaded): load its weights "
                         "first, or use `neuqi quantize MODEL --low-memory` for a model on disk")
    if len(devices) != 1:
        raise ValueError(f"the model is spread over {sorted(map(str, devices))}; neuqi.quantize moves one "
                         "layer at a time to the work device: load it on one device (e.g. the CPU)")
    return devices.pop()


def _work_device(device: str | torch.device | None, home: torch.device) -> torch.device:
    if device is None:
        return home if home.type == "cuda" else resolve_device("auto")
    return resolve_device(str(device))


def _swap_in_quantlinears(model: nn.Module, records: dict[str, QuantizedLinear], quant: QuantConfig) -> None:
    """Replace each quantized ``nn.Linear`` by a ``QuantLinear`` holding its packed codes."""
    qc = quantization_config(quant.spec, quant.zero_point, quant.act_order, records,
                             None if quant.gguf is None else quant.gguf_type.name)
    dtype = model.get_submodule(qc["modules"][0]).weight.dtype
    replace_linears(model, qc["modules"], qc, dtype)
    replace_experts(model, qc.get("experts", []), qc, dtype)
    state = model.state_dict()
    for key, value in packed_state(records, quant.spec, quant.zero_point).items():
        state[key].copy_(value)
    model.quantization_config = qc


def _save_run(folder: Path, model, tokenizer, records, quant: QuantConfig, stats: list[dict],
              timing: dict, device: torch.device, anon_mb, overwrite: bool) -> None:
    name = short_model_name(getattr(model.config, "_name_or_path", "") or model.config.model_type)
    run_info = {"config": {**asdict(quant), "model": name, "run_name": folder.name},
                "environment": environment(device)}
    with run_directory(folder, overwrite) as work:
        write_checkpoint(model, records, quant.spec, quant.zero_point, quant.act_order, work, tokenizer,
                         run_info,
                         gguf_type=None if quant.gguf is None else quant.gguf_type.name,
                         gguf_mix=quant.gguf if quant.is_gguf_mix else None)
        result = run_result(run_info, folder.name, stats, timing, work,
                            {**peak_memory(device), "peak_anon_mb": anon_mb})
        atomic_write_json(work / "result.json", result)
