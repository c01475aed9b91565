"""``make demo``: the default model to 3-bit g64 with NeUQI+LDLQ, compared with FP and GPTQ.

Sized for a 2-core CPU (under 15 minutes with the install): a short calibration
(16 × 512 tokens of c4-sample) and perplexity on the first 4 windows of 2048
tokens of wiki-sample and brown.  ``neuqi quantize`` defaults are the paper's.
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

EVAL_SETS = ["wiki-sample", "brown"]


def run_demo(
    cache: Path | None, out_dir: Path, nsamples: int, seqlen: int, eval_windows: int,
    console: Console,
) -> None:
    root = cache_dir(cache)
    model_dir = fetch_model(root)
    for name in ["c4-sample", *EVAL_SETS]:
        fetch_corpus(name, root)
    rows = []
    device = resolve_device("auto")
    fp = load_model(model_dir, resolve_dtype("auto", device))
    tok = load_tokenizer(model_dir)
    console.print("[bold]full-precision model[/]")
    fp_ppl = evaluate_sets(fp, tok, EVAL_SETS, 2048, device, eval_windows, quiet=False)
    rows.append(("FP (de-quantized Q4_1 GGUF)", "-", fp_ppl, None))
    del fp
    for init, label in (("minmax", "GPTQ/LDLQ + min-max"), ("neuqi", "NeUQI + LDLQ")):
        cfg = RunConfig(model=str(model_dir), bits=3, group_size=64, init=init,
                        nsamples=nsamples, seqlen=seqlen, out_dir=str(out_dir),
                        eval_sets=EVAL_SETS, eval_windows=eval_windows)
        console.print(f"[bold]{label}[/]: {cfg.run_name}")
        run_dir = quantize_model(cfg)
        res = read_result(run_dir)
        rows.append((label, cfg.run_name, res["eval"]["ppl"], res["timing"]["quantize_seconds"]))
    table = Table(title=f"SmolLM2-135M, 3-bit g64: perplexity (first {eval_windows} windows of 2048)")
    table.add_column("model")
    for name in EVAL_SETS:
        table.add_column(name, justify="right")
    table.add_column("quantize s", justify="right")
    for label, _, ppl, secs in rows:
        table.add_row(label, *(f"{ppl[n]['ppl']:.3f}" for n in EVAL_SETS),
                      "-" if secs is None else f"{secs:.0f}")
    console.print(table)
    console.print(f"runs saved under {out_dir}/")
