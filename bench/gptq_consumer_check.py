"""Does GPTQModel itself load our ``gptq`` (v2) export and compute what we compute?

    python bench/gptq_consumer_check.py EXPORT_DIR RUN_DIR

Runs GPTQModel in its own venv (``.venv-peers/gptqmodel``, made by ``make bench-peers``)
and compares every layer's de-quantized weight (GPTQModel's own unpacking) and the
logits on 256 random tokens with ours (GPTQModel computes in fp16 on CPU, we in fp32
with the exported fp16 tensors, so logits differ by fp16 arithmetic).  Prints and
writes ``EXPORT_DIR/gptqmodel_check.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch

from neuqi.formats.export.source import read_source
from neuqi.formats.export.verify import our_model
from neuqi.io_utils import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("run", type=Path)
    args = ap.parse_args()
    python = ROOT / ".venv-peers" / "gptqmodel" / "bin" / "python"
    if not python.exists():
        raise SystemExit("no GPTQModel venv: run `make bench-peers` first")
    src = read_source(args.run)
    ours = our_model(src, torch.float16)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, Path(tmp) / "ids.pt")
        proc = subprocess.run([str(python), str(ROOT / "bench" / "peer_tools" / "gptqmodel_logits.py"),
                               str(args.export), str(Path(tmp) / "ids.pt"), str(Path(tmp) / "logits.pt")],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"GPTQModel could not load the export:\n{proc.stderr[-2000:]}")
        got = torch.load(Path(tmp) / "logits.pt")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    modules = dict(ours.named_modules())
    weight_err = 0.0
    for name, w in got["weights"].items():
        mine_w = modules[name].dequantize().to(torch.float16).float()
        weight_err = max(weight_err, float((w - mine_w).abs().max() / mine_w.abs().max()))
    with torch.no_grad():
        mine = ours(input_ids=ids).logits.float()
    theirs = got["logits"]
    res = {**info, "layers": len(got["weights"]), "max_rel_weight_diff": weight_err, "tokens": ids.numel(),
           "max_rel_logit_diff": float((theirs - mine).abs().max() / mine.std()),
           "mean_rel_logit_diff": float((theirs - mine).abs().mean() / mine.std()),
           "top1_agreement": float((theirs.argmax(-1) == mine.argmax(-1)).float().mean())}
    atomic_write_json(args.export / "gptqmodel_check.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
