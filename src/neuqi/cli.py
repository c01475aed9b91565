"""Command line: parses arguments and calls one function per command."""

from __future__ import annotations

import inspect
import json
import logging
import typing
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="NeUQI quantization of Hugging Face causal LMs.")
console = Console()

DEFAULT_EVAL = "wiki-sample,brown,austen-test"


def _setup_logging(quiet: bool) -> None:
    # The root logger passes INFO on (the run's log file wants it); the terminal
    # handler shows warnings only when quiet.
    handler = RichHandler(console=Console(stderr=True), show_path=False)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(code=2)


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _cli_type(f, hints: dict) -> type:
    """What a ``QuantConfig`` field's flag parses to: its own type unless it names one."""
    return f.metadata.get("cli_type") or hints[f.name]


def with_quant_options(command):
    """Give a typer command one option per ``QuantConfig`` field (its help, its flags).

    The command declares ``quant: dict`` and receives the fields' values there, so
    the flags cannot drift from the options the API and the run name use.
    """
    from neuqi.pipeline.config import QuantConfig

    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
           for p in inspect.signature(command).parameters.values() if p.name != "quant"]
    qhints = typing.get_type_hints(QuantConfig)
    added = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
            annotation=Annotated[_cli_type(f, qhints), typer.Option(
                *f.metadata["flags"], help=f.metadata["help"], rich_help_panel="Quantization")])
        for f in fields(QuantConfig)
    ]
    names = [f.name for f in fields(QuantConfig)]

    def wrapper(**kwargs):
        quant = {n: kwargs.pop(n) for n in names}
        return command(quant=quant, **kwargs)

    wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
    params = own[:1] + added + own[1:]  # MODEL, then the quantization options, then the run's
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


@app.command()
@with_quant_options
def quantize(
    model: Annotated[str, typer.Argument(help="local HF model folder or .gguf file")],
    quant: dict,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    out_dir: Path = Path("runs"),
    eval: Annotated[str, typer.Option(help="perplexity sets after quantizing, '' for none")] = "",
    eval_seqlen: int = 2048,
    eval_windows: Annotated[int | None, typer.Option(help="cap on windows per set")] = None,
    low_memory: Annotated[bool, typer.Option(help="read one layer at a time from the shards")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="replace an existing run of the same name (and drop an interrupted run's state)")] = False,
    resume: Annotated[bool, typer.Option(
        help="continue an interrupted run of the same command after its last finished layer")] = False,
    save_state: Annotated[bool, typer.Option(
        help="save each finished layer to OUT_DIR/.RUN_NAME.resume so the run can --resume")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Quantize MODEL layer by layer and save a packed checkpoint under OUT_DIR/RUN_NAME."""
    from neuqi.pipeline.config import RunConfig
    from neuqi.pipeline.run import quantize_model

    _setup_logging(quiet)
    try:
        cfg = RunConfig(model=model, **quant, dtype=dtype, device=device, out_dir=str(out_dir),
                        eval_sets=_split(eval), eval_seqlen=eval_seqlen, eval_windows=eval_windows,
                        low_memory=low_memory, overwrite=overwrite, resume=resume, save_state=save_state)
        run_dir = quantize_model(cfg, quiet=quiet)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
        return
    console.print(f"[green]done:[/] {run_dir}")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="FP model, .gguf, or a neuqi run folder")],
    ppl: Annotated[str, typer.Option(help="wiki-sample,brown,wiki-extra,wikitext2,c4,FILE")] = DEFAULT_EVAL,
    seqlen: int = 2048,
    windows: Annotated[int | None, typer.Option(help="cap on windows per set")] = None,
    kl: Annotated[str | None, typer.Option(help="FP model to measure KL / top-1 against")] = None,
    tasks: Annotated[str, typer.Option(
        help="lm-eval tasks, e.g. arc_easy,arc_challenge,hellaswag,piqa,winogrande or the offline "
             "bigbench_social_iqa,bigbench_winowhy,bigbench_strategyqa,bigbench_logical_deduction,"
             "bigbench_misconceptions,austen_lambada ('offline' = all of those)")] = "",
    limit: Annotated[float | None, typer.Option(help="lm-eval: examples per task (or fraction)")] = None,
    batch_size: Annotated[str, typer.Option(help="lm-eval batch size ('auto' or N)")] = "auto",
    backend: Annotated[str, typer.Option(help="lm-eval backend: hf | vllm")] = "hf",
    record: Annotated[Path | None, typer.Option(help="also merge results into this JSON (FP rows for "
                                                     "`neuqi report`)")] = None,
    device: str = "auto",
    dtype: str = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Perplexity, KL from the FP model and zero-shot accuracy; results merge into a run's result.json."""
    from neuqi.data.tasks import OFFLINE_TASKS
    from neuqi.eval.run import evaluate_model

    _setup_logging(quiet)
    task_list = [t for x in _split(tasks) for t in (OFFLINE_TASKS if x == "offline" else [x])]
    bs: str | int = int(batch_size) if batch_size.isdigit() else batch_size
    lim = int(limit) if limit is not None and limit >= 1 else limit
    try:
        res = evaluate_model(model, _split(ppl), seqlen, windows, kl, device, dtype, quiet,
                             task_list, lim, bs, backend, record)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
        return
    if res.get("ppl"):
        table = Table(title=f"perplexity, seqlen {seqlen}")
        table.add_column("set")
        table.add_column("ppl", justify="right")
        table.add_column("windows", justify="right")
        for name, r in res["ppl"].items():
            table.add_row(name, f"{r['ppl']:.3f}" if "ppl" in r else r.get("error", "?"),
                          str(r.get("windows", "")))
        console.print(table)
    for name, r in res.get("kl", {}).items():
        console.print(f"KL({name}) = {r['kl']:.5f}, top-1 agreement {r['top1_agreement']:.4f}")
    if "zeroshot" in res:
        _print_zeroshot(res["zeroshot"])


def _print_zeroshot(zs: dict) -> None:
    limit = f", limit {zs['limit']}" if zs.get("limit") else ""
    table = Table(title=f"zero-shot (lm-evaluation-harness){limit}")
    for col in ("task", "acc", "acc_norm", "n"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, r in zs["tasks"].items():
        if "error" in r:
            table.add_row(name, r["error"][:90], "", "")
            continue
        acc = f"{r['acc']:.4f} ± {r.get('acc_stderr', 0):.4f}" if "acc" in r else ""
        table.add_row(name, acc, f"{r['acc_norm']:.4f}" if "acc_norm" in r else "", str(r.get("samples", "")))
    if "mean_acc" in zs:
        table.add_row("mean", f"{zs['mean_acc']:.4f}", f"{zs.get('mean_acc_norm', float('nan')):.4f}", "")
    console.print(table)


@app.command()
def distill(
    run: Annotated[Path, typer.Argument(help="a finished neuqi run folder (the student)")],
    teacher: Annotated[str, typer.Option(help="the FP model (folder or .gguf)")],
    data: Annotated[str, typer.Option(help="c4-sample | austen-calib | c4 | FILE")] = "c4-sample",
    nsamples: int = 256,
    seqlen: int = 2048,
    epochs: int = 1,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate; default 3e-4, GGUF runs 1e-3 (relative to each step)")] = None,
    warmup: Annotated[float, typer.Option(help="warm-up fraction of the cosine schedule")] = 0.1,
    batch_size: int = 1,
    grad_accum: int = 1,
    loss: Annotated[str, typer.Option(help="mse (final hidden states) | kl (logits)")] = "mse",
    free_zero: Annotated[bool, typer.Option(help="let integer zero-points train as floats")] = False,
    grad_checkpointing: bool = False,
    eval: Annotated[str, typer.Option(help="perplexity sets before/after, '' for none")] = DEFAULT_EVAL,
    eval_windows: Annotated[int | None, typer.Option(help="cap on windows per set")] = 8,
    save_every: Annotated[int, typer.Option(help="save the training state every N steps")] = 50,
    resume: Annotated[bool, typer.Option(help="continue from the last saved state")] = False,
    out_dir: Annotated[Path | None, typer.Option(help="default: beside the source run")] = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train scales, zero-points, norms and biases against the FP teacher (codes frozen;
    a GGUF run trains only the floats its type stores)."""
    from neuqi.distill import DistillConfig, distill_run

    _setup_logging(quiet)
    cfg = DistillConfig(run=str(run), teacher=teacher, data=data, nsamples=nsamples, seqlen=seqlen,
                        epochs=epochs, lr=lr, warmup=warmup, batch_size=batch_size, grad_accum=grad_accum,
                        loss=loss, free_zero=free_zero, grad_checkpointing=grad_checkpointing,
                        device=device, dtype=dtype, seed=seed, out_dir=str(out_dir) if out_dir else None,
                        eval_sets=_split(eval), eval_windows=eval_windows, save_every=save_every)
    try:
        out = distill_run(cfg, quiet, resume)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
        return
    res = json.loads((out / "result.json").read_text())
    table = Table(title=f"distillation ({res['distill']['steps']} steps, "
                        f"{res['timing']['distill_seconds']:.0f} s)")
    for col in ("set", "ppl before", "ppl after"):
        table.add_column(col, justify="left" if col == "set" else "right")
    for name, r in res["eval"]["ppl"].items():
        b = res["eval"]["ppl_before"].get(name, {})
        table.add_row(name, f"{b.get('ppl', float('nan')):.3f}", f"{r.get('ppl', float('nan')):.3f}")
    console.print(table)
    console.print(f"[green]wrote[/] {out}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="a finished neuqi run folder")],
    format: Annotated[str, typer.Option("--format", "-f", help="compressed-tensors | gptq | hqq | gguf")],
    out: Annotated[Path, typer.Option(help="export folder, or the .gguf file (replaced atomically)")],
    dtype: Annotated[str, typer.Option(help="float16 | bfloat16 | float32 for the unquantized tensors")]
    = "float16",
    checkpoint_format: Annotated[str, typer.Option(help="gptq only: gptq_v2 | gptq (v1, lossless only)")]
    = "gptq_v2",
    verify: Annotated[bool, typer.Option(help="re-load with the consumer library and compare logits")]
    = True,
    embed_type: Annotated[str | None, typer.Option(help="gguf only: type of token_embd (F32 F16 Q8_0 "
                                                        "Q5_1 Q5_0 Q4_1 Q4_0 Q6_K Q5_K Q4_K Q3_K Q2_K; "
                                                        "default: Q8_0, or the mix's choice)")] = None,
    output_type: Annotated[str | None, typer.Option(help="gguf only: type of an untied output head "
                                                         "(default: the embedding's, or the mix's choice)")]
    = None,
    source_gguf: Annotated[Path | None, typer.Option(help="gguf only: a GGUF of the same model for "
                                                          "metadata and tokenizer (default: the run's "
                                                          "own source file)")] = None,
) -> None:
    """Write a run in a format an inference engine loads; verified before it is put in place."""
    from neuqi.formats.export import export_run

    _setup_logging(True)
    gguf_options = {"embed_type": embed_type, "output_type": output_type, "source": source_gguf}
    try:
        res = export_run(run, format, out, dtype, checkpoint_format, verify,
                         gguf_options if format == "gguf" else None)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
        return
    _print_verify(res)
    files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    console.print(f"[green]wrote[/] {out} ({format}, {size / 2**20:.1f} MiB)")


@app.command("verify")
def verify_cmd(
    export_dir: Annotated[Path, typer.Argument(help="an export folder")],
    against: Annotated[Path, typer.Option(help="the neuqi run it was exported from")],
) -> None:
    """Re-load an export the way its engine does and compare it with our own model."""
    from neuqi.formats.export.verify import verify

    _setup_logging(True)
    try:
        res = verify(export_dir, against)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
        return
    _print_verify(res)
    if not res["ok"]:
        raise typer.Exit(code=1)


def _print_verify(res: dict) -> None:
    t, e = res.get("tensors", {}), res.get("engine", {})
    if "bit_exact" in res:  # gguf: the gguf package's dequantizer against our weights
        console.print(f"gguf dequantizer: {'bit-exact' if res['bit_exact'] else res.get('errors')} "
                      f"({res.get('linears', 0)} linears, embeddings {res.get('embedding_type')})")
        return
    if t:
        console.print(f"tensors: {'bit-exact' if t.get('bit_exact') else t.get('error')}"
                      f" ({t.get('linears', 0)} linears)")
    if "skipped" in e:
        console.print(f"engine check skipped: {e['skipped']}")
    elif e:
        console.print(f"engine logits: max |Δ|/std = {e['max_rel_logit_diff']:.2e} "
                      f"(tolerance {e['tolerance']:.0e}), top-1 agreement {e['top1_agreement']:.4f}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders, folders of runs, or result JSON files")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("report"),
    layers_of: Annotated[str | None, typer.Option(help="run (name part) for the per-layer plot")] = None,
) -> None:
    """Markdown table + PNG plots (perplexity and accuracy vs bits, per-layer loss)."""
    from neuqi.report import write_report

    try:
        res = write_report(runs, out, layers_of)
    except (ValueError, FileNotFoundError, OSError, KeyError) as exc:
        _fail(exc)
        return
    console.print((out / "report.md").read_text())
    console.print(f"[green]wrote[/] {', '.join(str(out / f) for f in res['files'])}")


@app.command()
def info(
    path: Annotated[Path | None, typer.Argument(help="a run folder (default: the data cache)")] = None,
) -> None:
    """Show where the data cache is, or a run's settings and results."""
    from neuqi.data.cache import cache_dir

    if path is None:
        cache = cache_dir()
        console.print(f"cache: {cache}")
        for p in sorted((cache / "models").glob("*")) + sorted((cache / "text").glob("*.txt")):
            console.print(f"  {p}")
        return
    res_path = path / "result.json"
    if not res_path.exists():
        _fail(FileNotFoundError(f"{path} has no result.json"))
    res = json.loads(res_path.read_text())
    console.print_json(json.dumps({k: v for k, v in res.items() if k != "layers"}, default=str))


@app.command()
def demo(
    cache: Annotated[Path | None, typer.Option(help="data cache folder")] = None,
    out_dir: Path = Path("runs"),
    nsamples: int = 16,
    seqlen: int = 512,
    eval_windows: int = 4,
) -> None:
    """The README's first command: SmolLM2-135M to 3-bit g64 with NeUQI+LDLQ, FP vs quantized."""
    from neuqi.demo import run_demo

    _setup_logging(False)
    try:
        run_demo(cache, out_dir, nsamples, seqlen, eval_windows, console)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
