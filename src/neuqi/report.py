"""``neuqi report``: one markdown table and a few PNG plots from runs' ``result.json``.

A record is a run folder (its ``result.json``), a folder of run folders, or a JSON file
in the same shape (``neuqi eval MODEL --record FILE`` writes one for the FP model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from neuqi.extras import require
from neuqi.io_utils import atomic_path, atomic_write_text
from neuqi.pipeline.config import DEFAULT_DAMP


def collect(paths: list[Path]) -> list[dict]:
    records = []
    for p in paths:
        if p.is_file():
            files = [p]
        elif (p / "result.json").exists():
            files = [p / "result.json"]
        else:
            files = sorted(p.glob("*/result.json"))
            if not files:
                raise FileNotFoundError(f"{p} holds no result.json (not a run folder or a folder of runs)")
        for f in files:
            rec = json.loads(f.read_text())
            rec.setdefault("run_name", f.parent.name)
            records.append(rec)
    return records


def method_label(cfg: dict) -> str:
    """Short method name: ``NeUQI+LDLQ``, ``GPTQ-minmax``, ``RTN``, ``FP16`` …"""
    if cfg.get("method") == "fp":
        return "FP"
    if cfg.get("label"):  # another tool's run (bench/peers.py) names itself
        return cfg["label"]
    algo = {"ldlq": "LDLQ", "gptq": "GPTQ", "rtn": "RTN"}.get(cfg.get("method", ""), cfg.get("method", "?"))
    init = {"neuqi": "NeUQI", "neuqi_int": "NeUQI_int", "minmax": "minmax", "mse": "MSE"}.get(
        cfg.get("init", ""), cfg.get("init", "?"))
    if algo == "RTN":
        label = f"RTN-{init}"
    elif init == "minmax":
        label = f"{algo}-minmax"
    else:
        label = f"{init}+{algo}"
    if cfg.get("magr"):
        label = "MagR+" + label
    if cfg.get("max_clip") is not None:
        label += f" clip{cfg['max_clip']:g}"
    if cfg.get("select"):
        label += f" select({cfg['select']})"
    if cfg.get("refit"):
        label += f" refit{cfg['refit']}"
    if cfg.get("descent"):
        label += f" cd{cfg['descent']}"
    if cfg.get("init_norm", 2.0) != 2.0:
        label += f" norm{cfg['init_norm']:g}"
    if cfg.get("h_power", 1.0) != 1.0:
        label += f" diag(H)^{cfg['h_power']:g}"
    if cfg.get("search", "auto") != "auto":
        label += f" search-{cfg['search']}"
    if cfg.get("fp_target"):
        label += f" fp-target{cfg['fp_target']:g}"
    if cfg.get("damp", DEFAULT_DAMP) != DEFAULT_DAMP:
        label += f" damp{cfg['damp']:g}"
    if cfg.get("distilled"):
        label += "+distill"
    return label


def rows(records: list[dict]) -> tuple[list[str], list[dict]]:
    sets: list[str] = []
    out = []
    for rec in records:
        cfg = rec.get("config", {})
        ppl = {k: v["ppl"] for k, v in rec.get("eval", {}).get("ppl", {}).items() if "ppl" in v}
        sets += [s for s in ppl if s not in sets]
        zs = rec.get("eval", {}).get("zeroshot", {})
        kl = next(iter(rec.get("eval", {}).get("kl", {}).values()), {})
        gs = cfg.get("group_size")
        out.append({
            "run": rec.get("run_name", "?"),
            "method": method_label(cfg),
            "bits": cfg.get("bits", 16),
            "group": "-" if gs is None else "ch" if gs == -1 else f"g{gs}",
            "ppl": ppl,
            "zeroshot": zs.get("mean_acc"),
            "kl": kl.get("kl"),
            "top1": kl.get("top1_agreement"),
            "quantize_s": rec.get("timing", {}).get("quantize_seconds"),
            "peak_rss_mb": rec.get("memory", {}).get("peak_rss_mb"),
            "size_mb": rec["checkpoint_bytes"] / 2**20 if rec.get("checkpoint_bytes") else None,
            "layers": rec.get("layers", []),
        })
    return sets, out


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(sets: list[str], table: list[dict]) -> str:
    with_kl = any(r.get("kl") is not None for r in table)
    head = ["method", "bits", "group", *[f"ppl {s}" for s in sets], *(["KL", "top-1"] if with_kl else []),
            "zero-shot acc", "quantize s", "peak RSS MB", "size MB", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        kl = [_fmt(r.get("kl"), ".4f"), _fmt(r.get("top1"), ".3f")] if with_kl else []
        cells = [r["method"], str(r["bits"]), r["group"], *[_fmt(r["ppl"].get(s)) for s in sets], *kl,
                 _fmt(r["zeroshot"], ".4f"), _fmt(r["quantize_s"], ".0f"), _fmt(r["peak_rss_mb"], ".0f"),
                 _fmt(r["size_mb"], ".1f"), f"`{r['run']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    matplotlib = require("matplotlib", "report", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_vs_bits(table: list[dict], value, ylabel: str, title: str, path: Path, log: bool) -> bool:
    plt = _pyplot()

    series: dict[str, list[tuple[int, float]]] = {}
    for r in table:
        v = value(r)
        if v is not None and r["method"] != "FP":
            key = f"{r['method']} ({r['group']})"
            series.setdefault(key, []).append((r["bits"], v))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=key)
    fp = [value(r) for r in table if r["method"] == "FP" and value(r) is not None]
    if fp:
        ax.axhline(fp[0], color="black", linestyle="--", linewidth=1, label="FP")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("weight bits")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({b for pts in series.values() for b, _ in pts}))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_layer_loss(row: dict, path: Path) -> bool:
    plt = _pyplot()

    layers = [x for x in row["layers"] if "quant_loss" in x]
    if not layers:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    kinds: dict[str, list[tuple[int, float]]] = {}
    for i, x in enumerate(layers):
        kinds.setdefault(x["name"].rsplit(".", 1)[-1], []).append((i, max(x["quant_loss"], 1e-12)))
    for kind, pts in kinds.items():
        ax.scatter([i for i, _ in pts], [v for _, v in pts], s=14, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("linear layer (in quantization order)")
    ax.set_ylabel("quantization loss tr(ΔW H ΔWᵀ)")
    ax.set_title(f"per-layer loss: {row['method']} {row['bits']}-bit {row['group']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_loss_curve(curve: list[dict], path: Path, title: str) -> bool:
    """Distillation loss per optimizer step (log scale) with a moving average."""
    plt = _pyplot()

    if not curve:
        return False
    steps = [c["step"] for c in curve]
    loss = [c["loss"] for c in curve]
    k = max(1, len(loss) // 20)
    windows = [loss[max(0, i - k + 1): i + 1] for i in range(len(loss))]
    smooth = [sum(w) / len(w) for w in windows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({k} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("teacher–student loss")
    ax.set_title(f"distillation: {title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(paths: list[Path], out: Path, layers_of: str | None = None) -> dict:
    """Write ``report.md``, ``ppl_vs_bits.png``, ``acc_vs_bits.png``, ``layer_loss.png``."""
    sets, table = rows(collect(paths))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", markdown(sets, table))
    written = ["report.md"]
    if sets and plot_vs_bits(table, lambda r: r["ppl"].get(sets[0]), f"perplexity on {sets[0]} (log)",
                             f"Perplexity vs bits ({sets[0]}, lower is better)", out / "ppl_vs_bits.png",
                             log=True):
        written.append("ppl_vs_bits.png")
    if plot_vs_bits(table, lambda r: r["zeroshot"], "mean zero-shot accuracy",
                    "Zero-shot accuracy vs bits (higher is better)", out / "acc_vs_bits.png", log=False):
        written.append("acc_vs_bits.png")
    pick = [r for r in table if r["layers"] and (layers_of is None or layers_of in r["run"])]
    if pick and plot_layer_loss(pick[0], out / "layer_loss.png"):
        written.append("layer_loss.png")
    return {"rows": len(table), "files": written}
