"""Side by side with the tools people use: llm-compressor, GPTQModel, AutoRound, HQQ.

    make bench-peers            # = python bench/peers.py
    python bench/peers.py [--model PATH|qwen2.5-coder-0.5b] [--configs 3:64,2:64,3:-1,4:-1] [--tools ...]
        [--nsamples 32 --seqlen 512 --eval-windows 8 --kl-windows 2 --zeroshot-limit 60]

Every peer gets its own virtual environment under ``.venv-peers/<tool>`` (pinned
below), so its dependencies never touch ours.  The calibration windows are sampled
once by neuqi's own sampler (the same call our runs make) and saved; every tool is
fed exactly those windows.  Each peer writes dense weights holding its quantize-
dequantize values, and *our* evaluation code measures every run the same way:
perplexity (wiki-sample, brown, austen-test; windows of 2048), KL divergence from the
FP model and top-1 agreement (wiki-sample), zero-shot accuracy (offline tasks).

One tool runs at a time (wall times are comparable).  Everything is resumable: a
finished run or evaluation is reused, a failed peer keeps its own error in the table.
Writes ``bench/results/peers/<model>/{peers.json,peers.md}`` and the ``neuqi report``
plots there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from neuqi.data.cache import cache_dir
from neuqi.data.fetch import DEFAULT_MODEL, MODELS, fetch_model
from neuqi.data.tasks import OFFLINE_TASKS
from neuqi.eval.run import kl_on_set, merge_eval, zero_shot
from neuqi.io_utils import atomic_path, atomic_write_json, atomic_write_text
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import RunConfig, resolve_device, resolve_dtype, short_model_name
from neuqi.pipeline.run import calibration_windows, evaluate_sets
from neuqi.report import method_label, write_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl_table import METHODS, quantize_standalone  # a sibling bench script, not a package

ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = Path(__file__).resolve().parent / "peer_tools"
SETS = ["wiki-sample", "brown", "austen-test"]
KL_SET = "wiki-sample"

# tool -> pinned requirements of its own venv.  GPTQModel 7.7 requires torch >= 2.14.1,
# of which PyPI has only the CUDA build (it runs on CPU too); the others take the CPU
# wheel of our own torch.
VENVS: dict[str, list[str]] = {
    "llmcompressor": ["torch==2.13.0", "llmcompressor==0.14.0.1"],
    "autoround": ["torch==2.13.0", "auto-round==0.16.1"],
    "hqq": ["torch==2.13.0", "hqq==0.2.8.post1", "transformers==5.23.0"],
    "gptqmodel": ["torch==2.14.1", "gptqmodel==7.7.0"],
}
# (tool, variant, label); a variant is what the runner script understands.
PEERS = [
    ("llmcompressor", "minmax", "llm-compressor GPTQ (minmax)"),
    ("llmcompressor", "imatrix_mse", "llm-compressor GPTQ (imatrix_mse)"),
    ("gptqmodel", "gptq", "GPTQModel GPTQ (act-order)"),
    ("autoround", "neuqi", "AutoRound iters=0 + NeUQI (int zero)"),
    ("autoround", "tuned", "AutoRound tuned (200 iters)"),
    ("hqq", "hqq", "HQQ (float zero, no calibration)"),
]
# label -> (method, init, magr): exactly the runs of bench/ppl_table.py, so they are shared
OURS = METHODS
# The paper's methods; variants such as "NeUQI+LDLQ clip1" are asked for by name.
DEFAULT_OURS = [m for m in OURS if not any(k in m for k in ("clip", "refit", "hpow", "MSE"))]
DEFAULT_CONFIGS = "3:64,2:64,3:-1,4:-1"  # the claim (2-3 bit) first, so a cut-short run has it


# ----------------------------------------------------------------------------- venvs
def ensure_venv(tool: str, log_dir: Path) -> tuple[Path | None, str | None]:
    """``(python, None)`` for a ready venv, or ``(None, error)`` with pip's own words."""
    venv = ROOT / ".venv-peers" / tool
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    want = "\n".join(VENVS[tool])
    if stamp.exists() and stamp.read_text() == want:
        return python, None
    log = log_dir / f"install-{tool}.log"
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", VENVS[tool][0], "setuptools", "wheel"],
             [str(python), "-m", "pip", "install", "-q", "--no-build-isolation", *VENVS[tool][1:]]]
    env = {**os.environ, "BUILD_CUDA_EXT": "0"}  # GPTQModel: no kernels to compile on CPU
    with log.open("w") as fh:
        for cmd in steps:
            if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode:
                tail = [ln for ln in log.read_text().splitlines() if ln.strip() and "Location" not in ln]
                return None, f"install failed: {' '.join(tail[-3:])[-400:]}"
    stamp.write_text(want)
    return python, None


# ----------------------------------------------------------------------------- runs
def save_windows(windows: torch.Tensor, path: Path) -> str:
    with atomic_path(path) as tmp:
        torch.save(windows.clone(), tmp)
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def run_peer(tool: str, variant: str, bits: int, group: int, model: str, windows: Path, out: Path,
             timeout: int, retry_failed: bool = False) -> dict:
    """The peer's record (``peer.json``), produced once; a failure keeps its own error
    (and is run again only with ``retry_failed``)."""
    out, windows = out.resolve(), windows.resolve()  # the runner works in the run folder
    done = out / "peer.json"
    if done.exists():
        record = json.loads(done.read_text())
        if not (retry_failed and "error" in record):
            return record
        done.unlink()
    out.mkdir(parents=True, exist_ok=True)
    python, error = ensure_venv(tool, out.parent)
    if error:
        record = {"tool": tool, "variant": variant, "error": error}
        atomic_write_json(done, record)
        return record
    job = out / "job.json"
    atomic_write_json(job, {"model": model, "windows": str(windows), "bits": bits, "group_size": group,
                            "variant": variant, "out": str(out)})
    script = TOOLS_DIR / f"{tool}_run.py"
    with (out / "log.txt").open("w") as fh:
        try:
            proc = subprocess.run([str(python), str(script), str(job)], stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout, cwd=out)  # tools drop logs in their cwd
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if not done.exists():  # the runner died before it could write its own record
        tail = (out / "log.txt").read_text().strip().splitlines()[-3:]
        atomic_write_json(done, {"tool": tool, "variant": variant,
                                 "error": f"runner exit {rc} after {timeout if rc == 'timeout' else '?'} s: "
                                          + " ".join(tail)[-400:]})
    return json.loads(done.read_text())


def evaluate(model_dir: str, reference, tokenizer, record: Path, args, device) -> dict:
    """ppl on SETS, KL/top-1 on KL_SET, zero-shot: whatever ``record`` lacks."""
    ev = json.loads(record.read_text()).get("eval", {})
    missing = [s for s in SETS if ev.get("ppl", {}).get(s, {}).get("windows") != args.eval_windows]
    want_kl = ev.get("kl", {}).get(KL_SET, {}).get("windows") != args.kl_windows
    zs = ev.get("zeroshot", {})
    tasks = [] if args.zeroshot_limit == 0 else [
        t for t in args.tasks if zs.get("limit") != args.zeroshot_limit or t not in zs.get("tasks", {})]
    if not (missing or want_kl or tasks):
        return ev
    model = load_model(model_dir, resolve_dtype("auto", device))
    res: dict = {}
    if missing:
        res["ppl"] = evaluate_sets(model, tokenizer, missing, 2048, device, args.eval_windows)
    if want_kl and reference is not None:
        res["kl"] = {KL_SET: kl_on_set(model, reference, tokenizer, KL_SET, 2048, args.kl_windows,
                                       device, quiet=True)}
    if tasks:
        res["zeroshot"] = zero_shot(model, tokenizer, model_dir, tasks, args.zeroshot_limit, 16, device, "hf")
    merge_eval(record, res)
    return json.loads(record.read_text())["eval"]


def peer_result_json(rec: dict, label: str, bits: int, group: int, folder: Path) -> Path:
    """A ``result.json`` in neuqi's run shape, so ``neuqi report`` reads peers too."""
    path = folder / "result.json"
    if not path.exists():
        atomic_write_json(path, {
            "run_name": folder.name,
            "config": {"method": "peer", "label": label, "bits": bits, "group_size": group,
                       "tool": rec["tool"], "variant": rec["variant"]},
            "environment": {"tool_version": rec.get("version"), "torch": rec.get("torch")},
            "timing": {"quantize_seconds": rec.get("quantize_seconds"),
                       "wall_seconds": rec.get("wall_seconds")},
            "memory": {"peak_rss_mb": rec.get("peak_rss_mb"), "peak_anon_mb": rec.get("peak_anon_mb")},
            "checkpoint_bytes": rec.get("native_bytes") or None,
        })
    return path


# ----------------------------------------------------------------------------- table
def row_of(label: str, tool: str, bits: int, group: int, rec: dict | None, error: str | None = None,
           tasks: list[str] | None = None) -> dict:
    """One table row; the zero-shot figure is the mean acc over ``tasks`` (a run's record
    may hold more tasks, measured with another limit by another bench)."""
    rec = rec or {}
    ev = rec.get("eval", {})
    kl = ev.get("kl", {}).get(KL_SET, {})
    per_task = ev.get("zeroshot", {}).get("tasks", {})
    accs = [per_task[t]["acc"] for t in (tasks or per_task) if "acc" in per_task.get(t, {})]
    return {
        "tool": tool, "label": label, "bits": bits, "group_size": group,
        "ppl": {s: ev.get("ppl", {}).get(s, {}).get("ppl") for s in SETS},
        "kl": kl.get("kl"), "top1": kl.get("top1_agreement"),
        "zeroshot": sum(accs) / len(accs) if accs and len(accs) == len(tasks or per_task) else None,
        # a distilled run's time is its quantization plus the distillation
        "quantize_s": (rec.get("timing", {}).get("quantize_seconds") or 0)
        + (rec.get("timing", {}).get("distill_seconds") or 0) or None,
        "peak_rss_mb": rec.get("memory", {}).get("peak_rss_mb"),
        "peak_anon_mb": rec.get("memory", {}).get("peak_anon_mb"),
        "size_mb": rec["checkpoint_bytes"] / 2**20 if rec.get("checkpoint_bytes") else None,
        "error": error,
    }


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"Model `{meta['model']}`; calibration {meta['nsamples']}×{meta['seqlen']} tokens of c4-sample "
           f"(windows sha256 `{meta['windows_sha256'][:12]}`, the same for every tool); ppl on "
           f"{meta['eval_windows']} windows of 2048; KL/top-1 vs FP on {KL_SET} "
           f"({meta['kl_windows']} windows); zero-shot: mean acc over {len(meta['tasks'])} offline tasks, "
           f"first {meta['zeroshot_limit']} each; "
           f"{meta['hardware']}.", ""]
    head = ["config", "tool", "method", *[f"ppl {s}" for s in SETS], "KL", "top-1", "zero-shot",
            "quantize s", "peak RSS MB", "peak anon MB", "size MB"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        grp = "ch" if r["group_size"] == -1 else f"g{r['group_size']}"
        cfg = "-" if r["bits"] == 16 else f"{r['bits']}b {grp}"
        if r["error"]:
            out.append(f"| {cfg} | {r['tool']} | {r['label']} | " + f"failed: {r['error']}".replace("|", "/")
                       + " |" * (len(head) - 3))
            continue
        out.append("| " + " | ".join([
            cfg, r["tool"], r["label"], *[_f(r["ppl"][s], ".2f") for s in SETS], _f(r["kl"], ".4f"),
            _f(r["top1"], ".3f"), _f(r["zeroshot"], ".3f"), _f(r["quantize_s"], ".0f"),
            _f(r["peak_rss_mb"], ".0f"), _f(r["peak_anon_mb"], ".0f"), _f(r["size_mb"], ".1f")]) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main
def parse_configs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        bits, _, group = item.partition(":")
        pairs.append((int(bits), int(group or -1)))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help=f"local HF folder or a registry model {sorted(MODELS)} (default: {DEFAULT_MODEL})")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="bits:group,... (group -1 = channel-wise)")
    ap.add_argument("--tools", default=None,
                    help="comma list of tool or tool:variant (default: all but AutoRound tuned)")
    ap.add_argument("--ours", default=",".join(DEFAULT_OURS),
                    help=f"comma list of our methods, from {list(OURS)}")
    ap.add_argument("--distilled", nargs="*", default=[],
                    help="distilled run folders (neuqi distill) to add as NeUQI+LDLQ+distill rows")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--kl-windows", type=int, default=2)
    ap.add_argument("--zeroshot-limit", type=int, default=60, help="examples per task; 0 skips zero-shot")
    ap.add_argument("--tasks", default=",".join(OFFLINE_TASKS))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one peer run may take")
    ap.add_argument("--runs-dir", default="bench/results/runs",
                    help="where our runs live (shared with ppl_table)")
    ap.add_argument("--results", default="bench/results/peers")
    ap.add_argument("--retry-failed", action="store_true", help="run failed peers again")
    ap.add_argument("--reuse-only", action="store_true",
                    help="use only our runs that already exist in --runs-dir (no quantization of ours)")
    args = ap.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    if unknown := [m for m in args.ours.split(",") if m and m not in OURS]:
        ap.error(f"unknown --ours {unknown}; choose from {list(OURS)}")
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device("auto")
    model = str(fetch_model(cache_dir(), args.model or DEFAULT_MODEL)) if args.model in (None, *MODELS) \
        else args.model
    name = short_model_name(model)
    out = Path(args.results) / name
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    configs = parse_configs(args.configs)
    selected = [p for p in PEERS if p[1] != "tuned"] if args.tools is None else [
        p for p in PEERS for t in args.tools.split(",") if t in (p[0], f"{p[0]}:{p[1]}")]

    base = RunConfig(model=model, nsamples=args.nsamples, seqlen=args.seqlen, out_dir=args.runs_dir,
                     eval_sets=SETS, eval_windows=args.eval_windows)
    windows = calibration_windows(base, tokenizer)
    win_path = out / f"windows.n{args.nsamples}.L{args.seqlen}.pt"
    sha = save_windows(windows, win_path)
    hardware = (torch.cuda.get_device_name(0) if device.type == "cuda"
                else f"CPU only, {os.cpu_count()} cores, torch {torch.__version__}")
    meta = {"model": name, "nsamples": args.nsamples, "seqlen": args.seqlen, "windows_sha256": sha,
            "eval_windows": args.eval_windows, "kl_windows": args.kl_windows, "tasks": args.tasks,
            "zeroshot_limit": args.zeroshot_limit, "hardware": hardware,
            "peer_requirements": {t: VENVS[t] for t in {p[0] for p in selected}}}
    reference = load_model(model, resolve_dtype("auto", device))
    fp_record = out / "fp.json"
    if not fp_record.exists():
        atomic_write_json(fp_record, {"run_name": name,
                                      "config": {"method": "fp", "bits": 16, "model": model}})
    evaluate(model, None, tokenizer, fp_record, args, device)
    rows = [row_of("FP16", "-", 16, 0, json.loads(fp_record.read_text()), tasks=args.tasks)]
    report_inputs = [fp_record]

    def publish() -> None:
        atomic_write_json(out / "peers.json", {"meta": meta, "rows": rows})
        atomic_write_text(out / "peers.md", markdown(rows, meta))

    publish()
    for bits, group in configs:
        for label in [m for m in args.ours.split(",") if m]:
            cfg = dataclasses.replace(base, bits=bits, group_size=group, **OURS[label])
            run_dir = Path(args.runs_dir) / cfg.run_name
            t0 = time.perf_counter()
            if not (run_dir / "result.json").exists():
                if args.reuse_only:
                    logging.warning("no run %s: skipped (--reuse-only)", run_dir.name)
                    continue
                run_dir = quantize_standalone(cfg)
            evaluate(str(run_dir), reference, tokenizer, run_dir / "result.json", args, device)
            rows.append(row_of(method_label(cfg.to_dict()), "neuqi", bits, group,
                               json.loads((run_dir / "result.json").read_text()), tasks=args.tasks))
            report_inputs.append(run_dir)
            logging.warning("neuqi %s %db g%d done (%.0f s)", label, bits, group, time.perf_counter() - t0)
            publish()
        for d in args.distilled:
            rec = json.loads((Path(d) / "result.json").read_text())
            c = rec["config"]
            if (c["bits"], c["group_size"]) == (bits, group) and c.get("calib") == base.calib:
                evaluate(d, reference, tokenizer, Path(d) / "result.json", args, device)
                rows.append(row_of(method_label(c), "neuqi", bits, group,
                                   json.loads((Path(d) / "result.json").read_text()), tasks=args.tasks))
                report_inputs.append(Path(d))
                publish()
        for tool, variant, label in selected:
            folder = out / "runs" / f"{tool}.{variant}.{bits}bit.{'ch' if group == -1 else f'g{group}'}"
            rec = run_peer(tool, variant, bits, group, model, win_path, folder, args.timeout,
                           args.retry_failed)
            if "error" in rec:
                rows.append(row_of(label, tool, bits, group, None, rec["error"]))
            else:
                result = peer_result_json(rec, label, bits, group, folder)
                evaluate(str(folder / "model"), reference, tokenizer, result, args, device)
                rows.append(row_of(label, tool, bits, group, json.loads(result.read_text()),
                                   tasks=args.tasks))
                report_inputs.append(folder)
            logging.warning("%s %s %db g%d: %s", tool, variant, bits, group, rec.get("error", "ok"))
            publish()
    write_report(report_inputs, out)
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
