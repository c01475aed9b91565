"""Offline lm-eval tasks: construction (unit) and a real lm-eval run on a tiny model."""

import json
import re

import pytest
import torch

from neuqi.data import tasks as tasks_mod
from neuqi.data.tasks import bigbench_prompt, lambada_passages
from neuqi.eval.run import merge_eval
from neuqi.eval.zeroshot import lm_eval_model, run_tasks
from neuqi.models.loading import load_model, load_tokenizer

from ..conftest import SAMPLE_TEXT


def test_bigbench_prompt_follows_the_task_json_conventions():
    task = {"task_prefix": "Answer.\n", "append_choices_to_input": True}
    ex = {"input": "Is ice cold? ", "target_scores": {"yes": 1, "no": 0}}
    prompt, choices, gold = bigbench_prompt(task, ex)
    assert prompt == "Answer.\n\nQ: Is ice cold?\n  choice: yes\n  choice: no\nA:"
    assert choices == ["yes", "no"] and gold == 0
    task = {"example_input_prefix": "", "example_output_prefix": " ", "append_choices_to_input": False}
    prompt, _, gold = bigbench_prompt(task, {"input": "x", "target_scores": {"a": 0, "b": 1}})
    assert prompt == "x" and gold == 1


def test_lambada_passages_end_on_a_word_seen_in_context_and_are_deterministic():
    text = " ".join(f"Sentence {i} mentions the garden of Longbourn and other things." for i in range(300))
    a = lambada_passages(text, n=20, min_words=20, max_words=60)
    assert a == lambada_passages(text, n=20, min_words=20, max_words=60)
    assert len(a) == 20
    for p in a:
        assert re.search(rf"\b{p['target']}\b", p["context"]) and len(p["target"]) >= 4
        assert p["target"].lower() not in tasks_mod._STOP


@pytest.fixture
def tiny_tasks(tmp_path, monkeypatch):
    """The offline task set built from small local data instead of the 358 MB sdist."""
    examples = [{"input": f"Question {i}?", "target_scores": {"yes": i % 2, "no": 1 - i % 2}}
                for i in range(6)]
    bb = {sub: {"examples": examples} for subs in tasks_mod.BIGBENCH_TASKS.values() for sub in subs}
    monkeypatch.setattr(tasks_mod, "_bigbench_sdist", lambda cache: cache / "unused")
    monkeypatch.setattr(tasks_mod, "_read_bigbench", lambda sdist: bb)
    (tmp_path / "austen.txt").write_text(SAMPLE_TEXT)
    monkeypatch.setattr("neuqi.data.corpora.load_text", lambda name, cache=None: SAMPLE_TEXT)
    monkeypatch.setattr(tasks_mod, "lambada_passages", lambda text: lambada_passages(text, 5, 0, 40, 120))
    return tmp_path / "cache"


def test_lm_eval_runs_offline_tasks_on_our_model_object(tiny_model, tiny_tasks, tmp_path):
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    lm = lm_eval_model(model, tok, 4, torch.device("cpu"), "hf")
    res = run_tasks(lm, ["bigbench_winowhy", "austen_lambada", "no_such_task"], tiny_tasks)
    wino = res["tasks"]["bigbench_winowhy"]
    assert 0 <= wino["acc"] <= 1 and "acc_norm" in wino and wino["samples"] == 6
    lam = res["tasks"]["austen_lambada"]
    assert lam.get("perplexity", 0) > 1 and 0 <= lam["acc"] <= 1, lam
    assert "error" in res["tasks"]["no_such_task"]
    assert res["mean_acc"] == pytest.approx((wino["acc"] + lam["acc"]) / 2)
    # merged into a run's result.json, replacing per task and recomputing the mean
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"eval": {"zeroshot": {"tasks": {"bigbench_winowhy": {"acc": 0.0}}}}}))
    merge_eval(path, {"zeroshot": res})
    assert json.loads(path.read_text())["eval"]["zeroshot"]["mean_acc"] == pytest.approx(res["mean_acc"])
    # a task measured on another subset (another --limit) is kept but left out of the mean
    other = {"tasks": {"piqa": {"acc": 1.0, "acc_norm": 1.0}}, "limit": 7}
    merge_eval(path, {"zeroshot": other})
    zs = json.loads(path.read_text())["eval"]["zeroshot"]
    assert zs["tasks"]["bigbench_winowhy"]["acc"] == wino["acc"] and zs["tasks"]["piqa"]["limit"] == 7
    assert zs["mean_acc"] == 1.0 and zs["mean_over"] == ["piqa"]


def test_without_the_bigbench_sdist_the_other_tasks_build_and_bigbench_reports_why(
        tiny_model, tmp_path, monkeypatch):
    """PyPI answers 403 for bigbench-1.0.0 since 2026-12: austen_lambada must still build
    and run, each BIG-bench task must say what is missing, and a later copy must be used."""
    import urllib.error

    def refuse(url, timeout=None):
        raise urllib.error.HTTPError(url, 403, "Forbidden", None, None)

    monkeypatch.setattr(tasks_mod.urllib.request, "urlopen", refuse)
    monkeypatch.delenv("NEUQI_BIGBENCH_SDIST", raising=False)
    monkeypatch.setattr("neuqi.data.corpora.load_text", lambda name, cache=None: SAMPLE_TEXT)
    monkeypatch.setattr(tasks_mod, "lambada_passages", lambda text: lambada_passages(text, 5, 0, 40, 120))
    cache = tmp_path / "cache"
    tasks_mod.build_tasks(cache)
    assert tasks_mod.built_tasks(cache) == {"austen_lambada"}
    assert not (cache / "downloads" / tasks_mod.BIGBENCH_SDIST[0]).exists()  # no half-written file
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    res = run_tasks(lm_eval_model(model, tok, 4, torch.device("cpu"), "hf"),
                    ["bigbench_winowhy", "austen_lambada"], cache)
    assert "NEUQI_BIGBENCH_SDIST" in res["tasks"]["bigbench_winowhy"]["error"]
    assert 0 <= res["tasks"]["austen_lambada"]["acc"] <= 1
    # a file that is not the pinned sdist is refused by checksum, with the variable named
    bogus = tmp_path / "bigbench.tar.gz"
    bogus.write_bytes(b"not a tarball")
    monkeypatch.setenv("NEUQI_BIGBENCH_SDIST", str(bogus))
    with pytest.raises(tasks_mod.BigBenchUnavailable, match="sha256"):
        tasks_mod._bigbench_sdist(cache)
    # once the sdist is there, the missing tasks are added next to the ones already built
    monkeypatch.delenv("NEUQI_BIGBENCH_SDIST")
    examples = [{"input": "Q?", "target_scores": {"yes": 1, "no": 0}}]
    bb = {sub: {"examples": examples} for subs in tasks_mod.BIGBENCH_TASKS.values() for sub in subs}
    monkeypatch.setattr(tasks_mod, "_bigbench_sdist", lambda cache: cache / "unused")
    monkeypatch.setattr(tasks_mod, "_read_bigbench", lambda sdist: bb)
    tasks_mod.build_tasks(cache)
    assert tasks_mod.built_tasks(cache) == set(tasks_mod.OFFLINE_TASKS)
