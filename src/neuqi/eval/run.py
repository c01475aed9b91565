"""``neuqi eval``: perplexity (+ KL from the FP model) of a model or a finished run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from neuqi.data.corpora import consecutive_windows, load_text, tokenize
from neuqi.eval.perplexity import divergence
from neuqi.io_utils import atomic_write_json
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import resolve_device, resolve_dtype
from neuqi.pipeline.run import evaluate_sets, progress_bar

log = logging.getLogger(__name__)


def evaluate_model(
    model_path: str,
    sets: list[str],
    seqlen: int = 2048,
    max_windows: int | None = None,
    kl_reference: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quiet: bool = False,
    tasks: list[str] | None = None,
    limit: float | None = None,
    batch_size: str | int = "auto",
    backend: str = "hf",
    record: Path | str | None = None,
) -> dict:
    """Evaluate a model or a run; results merge into the run's ``result.json`` and,
    when ``record`` is given, into that JSON file too (how an FP model gets a row in
    ``neuqi report``)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = load_model(model_path, dt)
    tokenizer = load_tokenizer(model_path)
    res: dict = {}
    if sets:
        res["ppl"] = evaluate_sets(model, tokenizer, sets, seqlen, dev, max_windows, quiet)
    if tasks:
        res["zeroshot"] = zero_shot(model, tokenizer, model_path, tasks, limit, batch_size, dev, backend)
    if kl_reference:
        reference = load_model(kl_reference, dt)
        res["kl"] = {name: kl_on_set(model, reference, tokenizer, name, seqlen, max_windows, dev, quiet)
                     for name in sets if "error" not in res.get("ppl", {}).get(name, {})}
        del reference
    run_result = Path(model_path) / "result.json"
    if run_result.exists():
        merge_eval(run_result, res)
    if record is not None:
        record = Path(record)
        if not record.exists():
            name = Path(model_path).name
            atomic_write_json(record, {"run_name": name, "config": {"method": "fp", "bits": 16,
                                                                    "model": str(model_path)}})
        merge_eval(record, res)
    return res


def kl_on_set(model, reference, tokenizer, name: str, seqlen: int, max_windows: int | None,
              device, quiet: bool = False) -> dict:
    """KL from ``reference`` and top-1 agreement on the first ``max_windows`` windows of
    one text set; the window count is recorded so a later evaluation knows what it has."""
    windows = consecutive_windows(tokenize(load_text(name), tokenizer), seqlen, max_windows)
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"KL {name}", total=windows.shape[0], info="")
        res = divergence(model, reference, windows, device, lambda: bar.advance(task))
    return {**res, "windows": int(windows.shape[0])}


def zero_shot(model, tokenizer, model_path: str, tasks: list[str], limit, batch_size, device,
              backend: str) -> dict:
    from neuqi.data.cache import cache_dir
    from neuqi.eval.zeroshot import lm_eval_model, run_tasks
    from neuqi.formats.qlinear import QuantLinear

    for mod in model.modules():  # de-quantize once, not at every forward
        if isinstance(mod, QuantLinear):
            mod.cache = True
    lm = lm_eval_model(model, tokenizer, batch_size, device, backend, model_path)
    return run_tasks(lm, tasks, cache_dir(), limit)


def merge_eval(result_path: Path, res: dict) -> None:
    """Add evaluation results to a run's result.json (atomic rewrite); per-task and
    per-set entries are replaced, summary figures recomputed."""
    data = json.loads(result_path.read_text())
    ev = data.setdefault("eval", {})
    for kind, per_set in res.items():
        if kind == "zeroshot":
            from neuqi.eval.zeroshot import task_means

            zs = ev.setdefault("zeroshot", {"tasks": {}})
            limit = per_set.get("limit")
            zs["tasks"].update({t: {**r, "limit": limit} for t, r in per_set["tasks"].items()})
            zs["limit"] = limit
            # a mean over tasks measured on different subsets would compare nothing:
            # average the tasks that share the latest limit (older ones stay recorded)
            same = {t: r for t, r in zs["tasks"].items() if r.get("limit", limit) == limit}
            for key in ("mean_acc", "mean_acc_norm"):
                zs.pop(key, None)
            zs.update(task_means(same))
            zs["mean_over"] = sorted(t for t, r in same.items() if "error" not in r)
        else:
            ev.setdefault(kind, {}).update(per_set)
    atomic_write_json(result_path, data)
