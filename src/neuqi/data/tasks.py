"""Offline zero-shot tasks for lm-evaluation-harness, built from registry packages.

* ``bigbench_*``: multiple-choice sets from the ``bigbench==1.0.0`` sdist
  (``task.json`` files), prompted the way BIG-bench formats them (task prefix,
  ``Q:``/``A:`` prefixes, choices appended where the task asks for it). PyPI stopped
  serving that file in December 2026 (HTTP 403; the index lists only 0.0.1): a copy in
  ``<cache>/downloads/`` or at ``$NEUQI_BIGBENCH_SDIST`` is used, checked by sha256;
  without one these tasks are left out with a warning and the others are built;
* ``austen_lambada``: LAMBADA-style last-word prediction on the held-out Jane Austen
  novels (``austen-test``): passages whose final word already occurred in the passage,
  so context makes it predictable.

``build_tasks`` writes JSONL data and lm-eval YAML configs into ``<cache>/tasks/`` (never
into the repository); pass that folder to lm-eval's ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from neuqi.io_utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

BIGBENCH_SDIST = (
    "bigbench-1.0.0.tar.gz",
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
)
# our task name -> BIG-bench task folders whose examples it pools
BIGBENCH_TASKS = {
    "bigbench_social_iqa": ("social_iqa",),
    "bigbench_winowhy": ("winowhy",),
    "bigbench_strategyqa": ("strategyqa",),
    "bigbench_logical_deduction": ("logical_deduction/three_objects", "logical_deduction/five_objects",
                                   "logical_deduction/seven_objects"),
    "bigbench_misconceptions": ("misconceptions",),
}
OFFLINE_TASKS = (*BIGBENCH_TASKS, "austen_lambada")
TASKS_VERSION = 1
LAMBADA_PASSAGES = 500
LAMBADA_SEED = 1234
# stop words of ≥ 4 letters (shorter words never qualify as targets)
_STOP = frozenset({
    "been", "does", "each", "from", "have", "here", "might", "must", "shall", "should", "some",
    "such", "than", "that", "their", "them", "then", "there", "these", "they", "this", "those",
    "very", "were", "what", "when", "where", "which", "whom", "whose", "will", "with", "would",
    "your",
})


def tasks_dir(cache: Path) -> Path:
    return cache / "tasks" / f"v{TASKS_VERSION}"


# ------------------------------------------------------------------ BIG-bench
class BigBenchUnavailable(RuntimeError):
    """The BIG-bench sdist is neither cached, nor given, nor downloadable."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _bigbench_sdist(cache: Path) -> Path:
    """The pinned sdist (358 MB): ``$NEUQI_BIGBENCH_SDIST``, else the cached copy, else PyPI.

    ``pip download`` cannot be used: it builds the sdist's metadata, which fails on a
    direct-URL dependency of the package; we only need its data files."""
    name, url, sha = BIGBENCH_SDIST
    given = os.environ.get("NEUQI_BIGBENCH_SDIST")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise BigBenchUnavailable(f"NEUQI_BIGBENCH_SDIST={given} is not a file")
        if _sha256(path) != sha:
            raise BigBenchUnavailable(f"NEUQI_BIGBENCH_SDIST={given} is not {name} (sha256 differs; "
                                      f"want {sha})")
        return path
    path = cache / "downloads" / name
    if path.exists():
        return path
    log.info("downloading %s from PyPI (358 MB)", name)
    try:
        with atomic_path(path) as tmp:
            digest = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=300) as resp, tmp.open("wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
            if digest.hexdigest() != sha:
                raise RuntimeError(f"checksum mismatch for {name}: {digest.hexdigest()} != {sha}")
    except (urllib.error.URLError, OSError) as exc:
        raise BigBenchUnavailable(
            f"cannot download {name} from PyPI ({exc}); PyPI no longer serves it. Put a copy at "
            f"{path} or point NEUQI_BIGBENCH_SDIST at one (sha256 {sha}). austen_lambada and "
            "lm-eval's own tasks (with their data cached) work without it") from exc
    return path


def _read_bigbench(sdist: Path) -> dict[str, dict]:
    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{sub}/task.json": sub
              for subs in BIGBENCH_TASKS.values() for sub in subs}
    found: dict[str, dict] = {}
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf:
            if member.name in wanted:
                found[wanted[member.name]] = json.loads(tf.extractfile(member).read())
    missing = set(wanted.values()) - set(found)
    if missing:
        raise RuntimeError(f"{sdist.name} lacks BIG-bench tasks {sorted(missing)}")
    return found


def bigbench_prompt(task: dict, example: dict) -> tuple[str, list[str], int]:
    """BIG-bench's own multiple-choice formatting → (prompt, choices, gold index)."""
    choices = list(example["target_scores"])
    gold = max(range(len(choices)), key=lambda i: example["target_scores"][choices[i]])
    text = task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ") + example["input"].strip()
    if task.get("append_choices_to_input", True):
        prefix = task.get("choice_prefix", "\n  choice: ")
        text += "".join(prefix + c for c in choices)
    text += task.get("example_output_prefix", "\nA: ").rstrip()
    return text.lstrip("\n"), choices, gold


# ------------------------------------------------------------------ austen_lambada
def lambada_passages(text: str, n: int = LAMBADA_PASSAGES, seed: int = LAMBADA_SEED,
                     min_words: int = 60, max_words: int = 160) -> list[dict]:
    """Passages ending with a sentence whose last word occurred earlier in the passage
    (a content word: alphabetic, ≥ 4 letters, not a stop word)."""
    sentences = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    candidates = []
    for end in range(1, len(sentences)):
        last = sentences[end]
        m = re.match(r"^(.*\s)([A-Za-z]{4,})([.!?])$", last)
        if not m or m.group(2).lower() in _STOP:
            continue
        start = end
        words = len(last.split())
        while start > 0 and words < min_words:
            start -= 1
            words += len(sentences[start].split())
        if not min_words <= words <= max_words:
            continue
        context = " ".join(sentences[start:end]) + " " + m.group(1).rstrip()
        target = m.group(2)
        if re.search(rf"\b{target}\b", context):
            candidates.append({"context": context, "target": target})
    rng = random.Random(seed)
    rng.shuffle(candidates)
    return candidates[:n]


# ------------------------------------------------------------------ YAML + data
def _mc_yaml(name: str, data: Path) -> str:
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {TASKS_VERSION}.0
"""


def _lambada_yaml(data: Path) -> str:
    return f"""task: austen_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {TASKS_VERSION}.0
"""


def built_tasks(cache: Path) -> set[str]:
    """The offline tasks whose data and YAML are in the cache."""
    out = tasks_dir(cache)
    return {t for t in OFFLINE_TASKS if (out / f"{t}.yaml").exists()}


def build_tasks(cache: Path) -> Path:
    """Write every offline task it can (data + YAML) once; returns lm-eval's include path.

    Each task is written on its own, so BIG-bench's absence (see the module docstring)
    costs only its tasks, and they are built on a later call once the sdist is there."""
    out = tasks_dir(cache)
    out.mkdir(parents=True, exist_ok=True)
    have = built_tasks(cache)
    if "austen_lambada" not in have:
        from neuqi.data.corpora import load_text

        passages = lambada_passages(load_text("austen-test", cache))
        data = out / "austen_lambada.jsonl"
        atomic_write_text(data, "".join(json.dumps(p) + "\n" for p in passages))
        atomic_write_text(out / "austen_lambada.yaml", _lambada_yaml(data.resolve()))
    if not set(BIGBENCH_TASKS) <= have:
        try:
            bb = _read_bigbench(_bigbench_sdist(cache))
        except BigBenchUnavailable as exc:
            log.warning("BIG-bench tasks left out: %s", exc)
            return out
        for name, subs in BIGBENCH_TASKS.items():
            rows = []
            for sub in subs:
                task = bb[sub]
                for ex in task["examples"]:
                    query, choices, gold = bigbench_prompt(task, ex)
                    rows.append({"query": query, "choices": choices, "gold": gold})
            data = out / f"{name}.jsonl"
            atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
            atomic_write_text(out / f"{name}.yaml", _mc_yaml(name, data.resolve()))
    return out
