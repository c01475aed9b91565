"""Named text sources and local files → one string; tokens → sampled windows.

Offline corpora (``c4-sample``, ``wiki-sample``, ``wiki-extra``, ``brown``) come
from the cache that ``neuqi.data.fetch`` fills; ``c4`` and ``wikitext2`` are the
literature's sets through ``datasets`` when it and its cache are reachable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from neuqi.data.cache import cache_dir

OFFLINE = ("c4-sample", "wiki-sample", "wiki-extra", "brown", "austen-calib", "austen-test")
HUB = ("c4", "wikitext2")
OFFLINE_HINT = (
    "offline alternatives: --calib c4-sample or austen-calib (calibration) and wiki-sample, "
    "brown, austen-test (evaluation), or a local .txt/.jsonl/.parquet file"
)


def load_text(source: str, cache: Path | None = None, split: str = "train") -> str:
    """The raw text of a named corpus or a local file (documents joined by blank lines)."""
    if source in OFFLINE:
        from neuqi.data.fetch import fetch_corpus

        return fetch_corpus(source, cache_dir(cache)).read_text(encoding="utf-8")
    if source in HUB:
        return _hub_text(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"text source {source!r} is neither a known corpus "
            f"({', '.join(OFFLINE + HUB)}) nor an existing file"
        )
    return _file_text(path)


def _file_text(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md", ".utf8"):
        return path.read_text(encoding="utf-8")
    if suffix in (".jsonl", ".json"):
        docs = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None
                docs.append(rec["text"] if isinstance(rec, dict) else str(rec))
        return "\n\n".join(docs)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading .parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path, columns=["text"])
        return "\n\n".join(str(t) for t in table.column("text").to_pylist())
    raise ValueError(f"unsupported text file type {suffix!r} ({path}); use .txt, .jsonl or .parquet")


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"{name} needs the `datasets` package; {OFFLINE_HINT}") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        files = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        return "\n\n".join(ds["text"])
    except Exception as exc:
        raise RuntimeError(f"{name} is not reachable here ({type(exc).__name__}); {OFFLINE_HINT}") from None


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids ``[T]`` of the whole text, tokenized once (the literature protocol)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[n, seqlen]`` random windows (seeded). Windows may overlap when the text is short."""
    if ids.numel() <= seqlen:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def consecutive_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[W, seqlen]`` windows from the start (perplexity protocol)."""
    count = ids.numel() // seqlen
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    if limit is not None:
        count = min(count, limit)
    return ids[: count * seqlen].view(count, seqlen)
