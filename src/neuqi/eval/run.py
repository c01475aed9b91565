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
) -> dict:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = load_model(model_path, dt)
    tokenizer = load_tokenizer(model_path)
    res: dict = {"ppl": evaluate_sets(model, tokenizer, sets, seqlen, dev, max_windows, quiet)}
    if kl_reference:
        reference = load_model(kl_reference, dt)
        res["kl"] = {}
        for name in sets:
            if "error" in res["ppl"].get(name, {}):
                continue
            ids = tokenize(load_text(name), tokenizer)
            windows = consecutive_windows(ids, seqlen, max_windows)
            with progress_bar(quiet) as bar:
                task = bar.add_task(f"KL {name}", total=windows.shape[0], info="")
                res["kl"][name] = divergence(model, reference, windows, dev,
                                             lambda t=task: bar.advance(t))
        del reference
    run_result = Path(model_path) / "result.json"
    if run_result.exists():
        merge_eval(run_result, res)
    return res


def merge_eval(result_path: Path, res: dict) -> None:
    """Add evaluation results to a run's result.json (atomic rewrite)."""
    data = json.loads(result_path.read_text())
    ev = data.setdefault("eval", {})
    for kind, per_set in res.items():
        ev.setdefault(kind, {}).update(per_set)
    atomic_write_json(result_path, data)
