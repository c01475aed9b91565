import json

import pytest
import torch

from neuqi.data.corpora import consecutive_windows, load_text, sample_windows


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello there")
    assert load_text(str(tmp_path / "a.txt")) == "hello there"
    with (tmp_path / "b.jsonl").open("w") as f:
        for t in ("one", "two"):
            f.write(json.dumps({"text": t}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known corpus"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        load_text(str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_windows_are_seeded_and_cover_the_text():
    ids = torch.arange(1000)
    a = sample_windows(ids, 8, 64, seed=3)
    assert torch.equal(a, sample_windows(ids, 8, 64, seed=3))
    assert not torch.equal(a, sample_windows(ids, 8, 64, seed=4))
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous spans
    w = consecutive_windows(ids, 100, limit=None)
    assert w.shape == (10, 100) and w[3, 0] == 300
    with pytest.raises(ValueError, match="fewer than"):
        sample_windows(ids[:10], 1, 64)
