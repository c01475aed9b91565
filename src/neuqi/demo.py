"""``make demo``: the default model to 3-bit g64 with NeUQI+LDLQ, compared with FP and GPTQ.

Sized for a 2-core CPU (under 15 minutes with the install): a short calibration
(16 × 512 tokens of c4-sample) and perplexity on the first 4 windows of 2048
tokens of wiki-sample (``bench/ppl_table.py`` adds brown and austen-test).
``neuqi quantize`` defaults are the paper's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from neuqi.data.cache import cache_dir
from neuqi.data.fetch import fetch_corpus, fetch_model
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import RunConfig, resolve_device, resolve_dtype
from neuqi.pipeline.run import evaluate_sets, quantize_model, read_result

log = logging.getLogger(__name__)

EVAL_SETS = ["wiki-sample"]


def run_demo(
    cache: Path | None, out_dir: Path, nsamples: int, seqlen: int, eval_windows: int,
    console: Console, model: Path | None = None, calib: str = "c4-sample", eval_seqlen: int = 2048,
) -> list[tuple]:
    """Quantize and compare; returns the table rows ``(label, run_name, ppl, seconds)``."""
    root = cache_dir(cache)
    model_dir = model or fetch_model(root)
    if model is None:
        for name in [calib, *EVAL_SETS]:
            fetch_corpus(name, root)
    rows = []
    device = resolve_device("auto")
    fp = load_model(model_dir, resolve_dtype("auto", device))
    tok = load_tokenizer(model_dir)
    console.print("[bold]full-precision model[/]")
    fp_ppl = evaluate_sets(fp, tok, EVAL_SETS, eval_seqlen, device, eval_windows, quiet=False)
    rows.append(("FP (de-quantized Q4_1 GGUF)", "-", fp_ppl, None))
    del fp
    for init, label in (("minmax", "GPTQ/LDLQ + min-max"), ("neuqi", "NeUQI + LDLQ")):
        cfg = RunConfig(model=str(model_dir), bits=3, group_size=64, init=init, calib=calib,
                        nsamples=nsamples, seqlen=seqlen, out_dir=str(out_dir), overwrite=True,
                        eval_sets=EVAL_SETS, eval_windows=eval_windows, eval_seqlen=eval_seqlen)
        console.print(f"[bold]{label}[/]: {cfg.run_name}")
        run_dir = quantize_model(cfg)
        res = read_result(run_dir)
        rows.append((label, cfg.run_name, res["eval"]["ppl"], res["timing"]["quantize_seconds"]))
    title = f"{Path(model_dir).name}, 3-bit g64: perplexity (first {eval_windows} windows of {eval_seqlen})"
    table = Table(title=title)
    table.add_column("model")
    for name in EVAL_SETS:
        table.add_column(name, justify="right")
    table.add_column("quantize s", justify="right")
    for label, _, ppl, secs in rows:
        table.add_row(label, *(f"{ppl[n]['ppl']:.3f}" for n in EVAL_SETS),
                      "-" if secs is None else f"{secs:.0f}")
    console.print(table)
    console.print(f"runs saved under {out_dir}/")
    return rows
