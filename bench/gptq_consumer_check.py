"""Does GPTQModel itself load our ``gptq`` (v2) export and compute what we compute?

    python bench/gptq_consumer_check.py EXPORT_DIR RUN_DIR

Runs GPTQModel in its own venv (``.venv-peers/gptqmodel``, made by ``make bench-peers``)
on 256 random tokens and compares its logits with our model's (fp16-rounded dense
tensors, as exported).  Prints and writes ``EXPORT_DIR/gptqmodel_check.json``.
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
        theirs = torch.load(Path(tmp) / "logits.pt")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        mine = ours(input_ids=ids).logits.float()
    res = {**info, "tokens": ids.numel(),
           "max_rel_logit_diff": float((theirs - mine).abs().max() / mine.std()),
           "top1_agreement": float((theirs.argmax(-1) == mine.argmax(-1)).float().mean())}
    atomic_write_json(args.export / "gptqmodel_check.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
