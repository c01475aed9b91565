"""neuqi's GGUF files against llama.cpp's own quantizer, measured by llama.cpp itself.

    python bench/gguf_vs_llamacpp.py [--model smollm2-135m] [--types Q4_0,Q5_0,Q4_1]
        [--nsamples 32 --seqlen 512] [--ctx 512 --chunks 40] [--rows llama,llama-imatrix,neuqi,rtn]
    python bench/gguf_vs_llamacpp.py --types Q8_0+ffn_down=Q3_K,Q8_0+ffn_down=Q2_K

Same FP GGUF in (the de-quantized float model written with the source GGUF's
metadata, F32), every linear at the same type in both tools (``llama-quantize --pure``)
and the token embedding / output head at Q8_0 in both.  A type ``BASE+NAME=TYPE``
puts the tensors named ``NAME`` (GGUF names: ffn_down, attn_v, ...) at ``TYPE`` and
every other linear at ``BASE`` in both tools (``--tensor-type`` / ``--gguf-tensor``).
Rows per type:

* ``llama``: ``llama-quantize --pure`` (its own block search, no importance matrix);
* ``llama-imatrix``: the same with ``llama-imatrix`` computed on our calibration windows
  (decoded to text, so both tools see the same tokens);
* ``neuqi``: NeUQI + LDLQ (act-order) under the type, exported with ``neuqi export``;
* ``rtn``: neuqi's round-to-nearest with min-max block parameters (a control);
* ``neuqi-fptarget``: as ``neuqi``, with ``--fp-target 0.25`` (each linear matches the
  FP model's output, a quarter of the way; docs/algorithms.md);
* any neuqi row followed by ``+distill`` (``neuqi-damp0.1-cd3+distill``): that run, then
  ``neuqi distill`` against the FP model on ``--distill-nsamples`` × ``--distill-seqlen``
  tokens of c4-sample (each type's stored floats trained, its integers kept), exported;
  ``+distill-kl`` the same with ``--loss kl`` (the logits' KL, llama.cpp's own measure);
  ``@LR`` after either (``neuqi+distill-kl@1e-3``) passes ``--lr LR`` (a GGUF run's
  rates are relative: ``neuqi.distill.student``).

Quality is measured by ``llama-perplexity`` (``-c ctx``, first ``chunks`` chunks) on
wiki-sample and brown, and its ``--kl-divergence`` mode against the FP GGUF on
wiki-sample: mean KL, top-1 agreement, the mean log ratio of the perplexities with its
own ± (the paired difference, tighter than the two files' perplexity ±), and the mean
change of the probability of the text's next token (Δp, percentage points).
Quantization seconds are wall time of the whole command, one process at a time.
Resumable: every finished file and measurement is reused, and an interrupted
quantization continues from its last finished layer (``--resume``; its seconds are then
the remainder's); results land in
``bench/results/gguf/<model>/{gguf.json,gguf.md}`` as they are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from neuqi.data.cache import cache_dir
from neuqi.data.fetch import MODELS, fetch_corpus, fetch_model
from neuqi.engines import llamacpp
from neuqi.io_utils import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
NEUQI = [sys.executable, "-m", "neuqi.cli"]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Results:
    """``gguf.json``: one record per key, written after every measurement."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"meta": meta, "rows": {}}
        self.data["meta"].update(meta)

    def get(self, key: str) -> dict:
        return self.data["rows"].setdefault(key, {})

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def calibration_text(model: str, nsamples: int, seqlen: int, seed: int, out: Path) -> Path:
    """Our calibration windows, decoded: llama-imatrix reads text, and this gives it ours."""
    if out.exists():
        return out
    from neuqi.models.loading import load_tokenizer
    from neuqi.pipeline.config import RunConfig
    from neuqi.pipeline.run import calibration_windows

    cfg = RunConfig(model=model, nsamples=nsamples, seqlen=seqlen, seed=seed)
    tok = load_tokenizer(str(fetch_model(cache_dir(), model)))
    windows = calibration_windows(cfg, tok)
    text = "\n\n".join(tok.decode(w.tolist(), skip_special_tokens=True) for w in windows)
    atomic_write_text(out, text)
    return out


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-12:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} … failed:\n" + "\n".join(tail))
    return time.perf_counter() - t0


# GGUF tensor names of a decoder layer's linears → the transformers module suffix.
HF_LINEAR = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}


def parse_type(spec: str) -> tuple[str, dict[str, str]]:
    """``Q8_0+ffn_down=Q3_K`` → ``("Q8_0", {"ffn_down": "Q3_K"})``."""
    base, *over = spec.split("+")
    pairs = dict(o.split("=", 1) for o in over)
    if bad := sorted(set(pairs) - set(HF_LINEAR)):
        raise SystemExit(f"unknown tensor name(s) {bad}; choose from {sorted(HF_LINEAR)}")
    return base, pairs


# neuqi's rows: the options of each (RunConfig fields; method and init are required)
NEUQI_ROWS: dict[str, dict] = {
    "neuqi": {"method": "ldlq", "init": "neuqi"},
    "rtn": {"method": "rtn", "init": "minmax"},
    "neuqi-fptarget": {"method": "ldlq", "init": "neuqi", "fp_target": 0.25},
    "neuqi-damp0.1": {"method": "ldlq", "init": "neuqi", "damp": 0.1},
    "neuqi-damp0.1-cd3": {"method": "ldlq", "init": "neuqi", "damp": 0.1, "descent": 3},
    "neuqi-damp0.3-cd3": {"method": "ldlq", "init": "neuqi", "damp": 0.3, "descent": 3},
    "neuqi-damp0.1-cd3-refit2": {"method": "ldlq", "init": "neuqi", "damp": 0.1, "descent": 3, "refit": 2},
    "neuqi-shrink0.5-cd3": {"method": "ldlq", "init": "neuqi", "shrink": 0.5, "descent": 3},
    "neuqi-damp0.1-shrink0.5": {"method": "ldlq", "init": "neuqi", "damp": 0.1, "shrink": 0.5},
    "neuqi-shrinkauto": {"method": "ldlq", "init": "neuqi", "shrink": "auto"},
    "neuqi-shrinkauto-cd3": {"method": "ldlq", "init": "neuqi", "shrink": "auto", "descent": 3},
}


# a row name ending so: that row's run, then `neuqi distill` with this loss, exported
DISTILL = {"+distill": "mse", "+distill-kl": "kl"}


def split_row(row: str) -> tuple[str, str | None, str | None]:
    """``(neuqi row, distillation loss or None, distillation lr or None)``."""
    row, _, lr = row.partition("@")
    for suffix, loss in DISTILL.items():
        if row.endswith(suffix):
            return row.removesuffix(suffix), loss, lr or None
    return row, None, None


def neuqi_gguf(model: str, t: str, row: str, args, work: Path) -> tuple[Path, float, float]:
    """Quantize with neuqi for type ``t`` with row ``row``'s options (then distil it,
    for a ``+distill`` row) and export; returns (file, quantize s incl. distillation,
    export s)."""
    from neuqi.pipeline.config import RunConfig

    base_row, loss, lr = split_row(row)
    opts = NEUQI_ROWS[base_row]
    base, over = parse_type(t)
    gguf_tensor = ",".join(f"{HF_LINEAR[n]}={ty}" for n, ty in over.items())
    cfg = RunConfig(model=model, gguf=base, gguf_tensor=gguf_tensor, nsamples=args.nsamples,
                    seqlen=args.seqlen, out_dir=str(work / "runs"), **opts)
    run_dir = work / "runs" / cfg.run_name
    tag = "".join(f"-{k.replace('_', '')}{v if isinstance(v, str) else format(v, 'g')}"
                  for k, v in opts.items() if k not in ("method", "init"))
    out = work / f"neuqi-{opts['method']}-{opts['init']}{tag}-{t.replace('+', '-').replace('=', '-')}.gguf"
    flags = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    q_s = e_s = 0.0
    if not (run_dir / "result.json").exists():
        q_s = timed([*NEUQI, "quantize", model, "--gguf", base, "--gguf-tensor", gguf_tensor, *flags,
                     "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                     "--out-dir", str(work / "runs"), "--eval", "", "--resume", "-q"],
                    work / f"{out.stem}.quantize.log")
    if loss is not None:
        n, L = args.distill_nsamples, args.distill_seqlen
        tag = ("" if loss == "mse" else f"-{loss}") + (f"-lr{lr}" if lr else "")
        dist_root = work / f"runs{tag}"
        src, run_dir = run_dir, dist_root / f"{run_dir.name}.distill.n{n}.L{L}"
        out = out.with_name(f"{out.stem}-distill-n{n}-L{L}{tag}.gguf")
        if not (run_dir / "result.json").exists():
            q_s += timed([*NEUQI, "distill", str(src), "--teacher", str(fetch_model(cache_dir(), model)),
                          "--nsamples", str(n), "--seqlen", str(L), "--loss", loss,
                          *(["--lr", lr] if lr else []),
                          "--out-dir", str(dist_root), "--eval", "", "--resume", "-q"],
                         work / f"{out.stem}.distill.log")
    if not out.exists():
        e_s = timed([*NEUQI, "export", str(run_dir), "--format", "gguf", "--out", str(out),
                     "--embed-type", "Q8_0"], work / f"{out.stem}.export.log")
    return out, q_s, e_s


def measure(rec: dict, gguf: Path, texts: dict[str, Path], kl_base: Path, args, save) -> None:
    for name, path in texts.items():
        if name not in rec.get("ppl", {}):
            r = llamacpp.perplexity(gguf, path, ctx=args.ctx, chunks=args.chunks)
            rec.setdefault("ppl", {})[name] = {"ppl": r.ppl, "err": r.ppl_err, "chunks": r.chunks}
            save()
    if "mean_dp_pct" not in rec.get("kl", {}):  # records from before Δp was read are measured again
        r = llamacpp.perplexity(gguf, texts["wiki-sample"], ctx=args.ctx, kl_base=kl_base)
        # its percentiles of KL and Δp, which the table leaves out
        atomic_write_text(gguf.with_suffix(".kl.log"), r.log)
        rec["kl"] = {"mean": r.kl_mean, "err": r.kl_err, "same_top1_pct": r.same_top1,
                     "ln_ppl_ratio": r.ln_ppl_ratio, "ln_ppl_ratio_err": r.ln_ppl_ratio_err,
                     "mean_dp_pct": r.mean_dp, "mean_dp_err": r.mean_dp_err, "rms_dp_pct": r.rms_dp}
        save()
    rec["bytes"] = gguf.stat().st_size
    save()


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [
        f"# GGUF: neuqi vs llama.cpp's quantizer — {m['model']}",
        "",
        f"Measured by llama.cpp {m['llama_cpp']} (built from the llama-cpp-python sdist): "
        f"`llama-perplexity -c {m['ctx']} --chunks {m['chunks']}`, KL against the F32 GGUF on "
        f"wiki-sample. Calibration: {m['nsamples']} × {m['seqlen']} tokens of c4-sample for both "
        f"tools. Every linear at the row's type (`--pure`), token embedding and output at Q8_0.",
        "",
        f"Command: `{m['command']}` — commit {m['commit']}, {m['machine']}, {m['date']}.",
        "",
        "| type | tool | wiki-sample PPL | brown PPL | KL vs F32 | same top-1 % | ln(PPL/PPL_F32) "
        "| mean Δp % | MiB | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rec in data["rows"].items():
        if key == "FP":
            continue
        t, tool = key.split("/", 1)
        ppl = rec.get("ppl", {})
        kl = rec.get("kl", {})

        def f(v, spec):
            return "—" if v is None else format(v, spec)

        def pm(v, err, spec):
            return "—" if v is None else f"{v:{spec}} ± {err:{spec}}"

        lines.append(
            f"| {t} | {tool} | {f(ppl.get('wiki-sample', {}).get('ppl'), '.3f')} | "
            f"{f(ppl.get('brown', {}).get('ppl'), '.3f')} | {f(kl.get('mean'), '.5f')} | "
            f"{f(kl.get('same_top1_pct'), '.2f')} | "
            f"{pm(kl.get('ln_ppl_ratio'), kl.get('ln_ppl_ratio_err'), '.4f')} | "
            f"{pm(kl.get('mean_dp_pct'), kl.get('mean_dp_err'), '.2f')} | "
            f"{f(rec.get('bytes', 0) / 2**20, '.1f')} | "
            f"{f(rec.get('quantize_s'), '.0f')} |"
            + (f" error: {rec['error'][:80]} |" if rec.get("error") else "")
        )
    fp = data["rows"].get("FP", {}).get("ppl", {})
    if fp:
        lines += ["", f"F32 GGUF: wiki-sample {fp.get('wiki-sample', {}).get('ppl', float('nan')):.3f}, "
                  f"brown {fp.get('brown', {}).get('ppl', float('nan')):.3f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    p.add_argument("--types", default="Q4_0,Q5_0,Q4_1")
    p.add_argument("--rows", default="llama,llama-imatrix,neuqi,rtn")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--distill-nsamples", type=int, default=64, help="+distill rows: windows of c4-sample")
    p.add_argument("--distill-seqlen", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf")
    args = p.parse_args()

    llamacpp.build()
    cache = cache_dir()
    fp_folder = fetch_model(cache, args.model)
    source = cache / "gguf" / MODELS[args.model].gguf_name
    work = args.out / args.model
    work.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "ctx": args.ctx,
        "chunks": args.chunks, "llama_cpp": f"llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION}",
        "commit": _git_commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(
            [str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0],
             *sys.argv[1:]]),
    }
    res = Results(work / "gguf.json", meta)

    def save() -> None:
        res.save()
        atomic_write_text(work / "gguf.md", markdown(res.data))

    from neuqi.formats.export.gguf import write_dense_gguf

    fp_gguf = work / "fp.f32.gguf"
    if not fp_gguf.exists():
        write_dense_gguf(fp_folder, source, fp_gguf, dtype="F32")
    texts = {n: fetch_corpus(n, cache) for n in ("wiki-sample", "brown")}
    kl_base = work / "fp.kl-base.bin"
    fp = res.get("FP")
    if not kl_base.exists():
        r = llamacpp.perplexity(fp_gguf, texts["wiki-sample"], ctx=args.ctx, chunks=args.chunks,
                                save_kl_base=kl_base)
        fp.setdefault("ppl", {})["wiki-sample"] = {"ppl": r.ppl, "err": r.ppl_err, "chunks": r.chunks}
        save()
    if "brown" not in fp.get("ppl", {}):
        r = llamacpp.perplexity(fp_gguf, texts["brown"], ctx=args.ctx, chunks=args.chunks)
        fp.setdefault("ppl", {})["brown"] = {"ppl": r.ppl, "err": r.ppl_err, "chunks": r.chunks}
        save()

    rows = args.rows.split(",")
    if bad := [r for r in rows if r not in ("llama", "llama-imatrix") and split_row(r)[0] not in NEUQI_ROWS]:
        raise SystemExit(f"unknown row(s) {bad}; choose llama, llama-imatrix or {', '.join(NEUQI_ROWS)} "
                         f"(each optionally followed by {' or '.join(DISTILL)}, then @LR)")
    imatrix = work / "imatrix.gguf"
    if "llama-imatrix" in rows and not imatrix.exists():
        calib = calibration_text(args.model, args.nsamples, args.seqlen, 0, work / "calib.txt")
        t0 = time.perf_counter()
        llamacpp.imatrix(fp_gguf, calib, imatrix, ctx=args.seqlen, chunks=args.nsamples)
        res.data["meta"]["imatrix_s"] = time.perf_counter() - t0
        save()
    for t in args.types.split(","):
        for row in rows:
            rec = res.get(f"{t}/{row}")
            if rec.get("error"):
                continue
            try:
                if row.startswith("llama"):
                    out = work / f"{row}-{t.replace('+', '-').replace('=', '-')}.gguf"
                    if not out.exists():
                        t0 = time.perf_counter()
                        im = imatrix if row == "llama-imatrix" else None
                        base, over = parse_type(t)
                        llamacpp.quantize(fp_gguf, out, base, imatrix=im, embed_type="Q8_0",
                                          output_type="Q8_0", tensor_types=over)
                        rec["quantize_s"] = time.perf_counter() - t0
                        save()
                else:
                    out, q_s, e_s = neuqi_gguf(args.model, t, row, args, work)
                    if q_s:
                        rec["quantize_s"], rec["export_s"] = q_s, e_s
                        save()
                measure(rec, out, texts, kl_base, args, save)
            except (RuntimeError, ValueError, FileNotFoundError) as exc:
                rec["error"] = str(exc)
                save()
            print(f"{t}/{row}: {json.dumps({k: v for k, v in rec.items() if k != 'error'})}", flush=True)
    print(markdown(res.data))


if __name__ == "__main__":
    main()
