"""Zero-shot accuracy through lm-evaluation-harness, on our loaded model object.

Standard tasks (arc_easy, arc_challenge, hellaswag, piqa, winogrande) need their data
from the hub or a local ``datasets`` cache; each task runs on its own, so one that is
unreachable is reported with its error and the others go on.  The offline tasks of
``neuqi.data.tasks`` need no network once built (the BIG-bench ones need its sdist, which
PyPI no longer serves: see that module).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from neuqi.data.tasks import BIGBENCH_SDIST, OFFLINE_TASKS, build_tasks, built_tasks
from neuqi.extras import require

log = logging.getLogger(__name__)

PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
OFFLINE_HINT = f"offline tasks: {', '.join(OFFLINE_TASKS)}"
NO_BIGBENCH = (f"not built: {BIGBENCH_SDIST[0]} is missing (PyPI no longer serves it); put it in "
               "<cache>/downloads/ or set NEUQI_BIGBENCH_SDIST, or use austen_lambada")


def _metrics(raw: dict) -> dict:
    """lm-eval's ``{"acc,none": …, "acc_stderr,none": …}`` → ``{"acc": …, "acc_stderr": …}``."""
    out = {}
    for key, value in raw.items():
        metric, _, _filter = key.partition(",")
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[metric] = float(value)
    return out


def lm_eval_model(model, tokenizer, batch_size: str | int, device: torch.device, backend: str,
                  model_path: str | None = None):
    """lm-eval's model wrapper: the HF backend around our object, or vLLM on a path."""
    if backend == "vllm":
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as exc:
            raise RuntimeError("--backend vllm needs vllm (GPU): pip install vllm") from exc
        if model_path is None:
            raise ValueError("--backend vllm loads from a folder vLLM reads (an FP model or an export)")
        return VLLM(pretrained=model_path, batch_size=batch_size)
    HFLM = require("lm_eval.models.huggingface", "eval", "zero-shot evaluation").HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))


def run_tasks(
    lm,
    tasks: list[str],
    cache: Path,
    limit: int | float | None = None,
    seed: int = 1234,
) -> dict:
    """``{"tasks": {name: metrics | {"error": …}}, "mean_acc": …, "mean_acc_norm": …}``."""
    lm_eval = require("lm_eval", "eval", "zero-shot evaluation")
    from lm_eval.tasks import TaskManager

    include = build_tasks(cache) if any(t in OFFLINE_TASKS for t in tasks) else None
    built = built_tasks(cache) if include else set()
    # lm-eval's own task index takes ~10-20 s to build here; offline tasks alone skip it.
    defaults = not all(t in OFFLINE_TASKS for t in tasks)
    manager = TaskManager(include_path=str(include) if include else None, include_defaults=defaults)
    results: dict[str, dict] = {}
    for task in tasks:
        if task in OFFLINE_TASKS and task not in built:
            log.warning("task %s skipped: %s", task, NO_BIGBENCH)
            results[task] = {"error": NO_BIGBENCH}
            continue
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          log_samples=False, bootstrap_iters=1000)
        except Exception as exc:  # lm-eval raises many kinds (hub, datasets, config)
            msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            log.warning("task %s skipped: %s", task, msg)
            hint = "" if task in OFFLINE_TASKS else f" ({OFFLINE_HINT})"
            results[task] = {"error": f"{type(exc).__name__}: {msg}{hint}"}
            continue
        metrics = _metrics(out["results"][task])
        metrics["samples"] = int(out.get("n-samples", {}).get(task, {}).get("effective", 0))
        results[task] = metrics
        log.info("%s: %s", task, {k: round(v, 4) for k, v in metrics.items()})
    return {"tasks": results, "limit": limit, **task_means(results)}


def task_means(results: dict[str, dict]) -> dict:
    """``mean_acc`` / ``mean_acc_norm`` over the tasks that report them (as the paper averages)."""
    means = {}
    for metric in ("acc", "acc_norm"):
        vals = [r[metric] for r in results.values() if metric in r]
        if vals:
            means[f"mean_{metric}"] = sum(vals) / len(vals)
    return means
