"""bench/peers.py orchestration and the peer runners' shared checks.

The HQQ runner runs for real on a tiny model (HQQ is in our test extra); the other
tools live in their own venvs and are exercised by ``make bench-peers`` only.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from neuqi.memory import process_memory_kb
from tests.conftest import make_tiny_model

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH / "peer_tools"))
import common  # noqa: E402  (the runners' helper module, importable without neuqi)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


peers = _load("bench_peers", BENCH / "peers.py")


def test_check_levels_accepts_a_grid_and_refuses_raw_weights():
    scale = torch.rand(8, 2, 1) + 0.1
    codes = torch.randint(0, 8, (8, 2, 32)).float()
    w = ((codes - 3.3) * scale).reshape(8, 64)
    common.check_levels({"w": w}, bits=3, group_size=32)
    with pytest.raises(RuntimeError, match="not quantized"):
        common.check_levels({"w": torch.randn(8, 64)}, bits=3, group_size=32)
    with pytest.raises(RuntimeError, match="not quantized"):  # 2 groups of 8 levels != one row of 8
        common.check_levels({"w": w}, bits=3, group_size=-1)


def test_parse_configs():
    assert peers.parse_configs("3:64,2:64,4:-1,3") == [(3, 64), (2, 64), (4, -1), (3, -1)]


def _fake_tool(tmp_path, monkeypatch, body: str) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "common.py").write_text((BENCH / "peer_tools" / "common.py").read_text())
    (tools / "fake_run.py").write_text(body)
    monkeypatch.setattr(peers, "TOOLS_DIR", tools)
    monkeypatch.setattr(peers, "ensure_venv", lambda tool, log_dir: (Path(sys.executable), None))


def test_a_crashing_peer_becomes_an_error_row_and_is_not_rerun(tmp_path, monkeypatch):
    _fake_tool(tmp_path, monkeypatch, "import sys\nprint('tool says: no kernel for this')\nsys.exit(3)\n")
    out = tmp_path / "runs" / "fake.x.3bit.g64"
    rec = peers.run_peer("fake", "x", 3, 64, "m", tmp_path / "w.pt", out, timeout=60)
    assert "runner exit 3" in rec["error"] and "no kernel for this" in rec["error"]
    (tmp_path / "tools" / "fake_run.py").write_text("raise SystemExit('must not run again')\n")
    assert peers.run_peer("fake", "x", 3, 64, "m", tmp_path / "w.pt", out, timeout=60) == rec
    again = peers.run_peer("fake", "x", 3, 64, "m", tmp_path / "w.pt", out, timeout=60, retry_failed=True)
    assert "must not run again" in again["error"]


def test_a_tool_exception_is_recorded_with_its_own_words(tmp_path, monkeypatch):
    body = ("import common\n"
            "def run(job, out):\n    raise ValueError('group size 64 unsupported for 3 bits')\n"
            "common.main(run, 'fake')\n")
    _fake_tool(tmp_path, monkeypatch, body)
    monkeypatch.chdir(tmp_path)  # relative paths, as the bench passes them: the runner works elsewhere
    rec = peers.run_peer("fake", "x", 3, 64, "m", Path("w.pt"), Path("runs/o"), timeout=60)
    assert rec["error"] == "ValueError: group size 64 unsupported for 3 bits"
    assert rec["peak_rss_mb"] > 0 and "traceback" in rec


def test_peer_peak_rss_is_its_own_and_taken_when_the_quantization_call_returns(tmp_path, monkeypatch):
    """Neither the bench process's RSS (``ru_maxrss`` survives exec) nor what the runner
    allocates afterwards (read-back, dense copy) is the tool's."""
    body = ("import common\n"
            "def run(job, out):\n"
            "    common.timed(lambda: None)\n"
            "    after = b'x' * (400 * 2**20)  # the runner's own work, resident\n"
            "    return {'quantize_seconds': 0.0, 'n': len(after)}\n"
            "common.main(run, 'fake')\n")
    _fake_tool(tmp_path, monkeypatch, body)
    ballast = torch.ones(2**30 // 4)  # the bench process is large; its RSS is not the peer's
    rec = peers.run_peer("fake", "x", 3, 64, "m", tmp_path / "w.pt", tmp_path / "o", timeout=60)
    assert rec["peak_rss_scope"] == "through the quantization call"
    assert rec["peak_rss_mb"] < 300 < rec["runner_peak_rss_mb"] < 900 and float(ballast[0]) == 1.0
    if rec["peak_anon_mb"] is not None:  # Linux: the private part, same scope
        assert rec["peak_anon_mb"] < rec["peak_rss_mb"]


def test_peer_anon_peak_counts_a_transient_inside_the_quantization_call(tmp_path, monkeypatch):
    """What a tool frees before returning still counts (sampled), and its file-backed
    pages do not: the fair memory figure across tools that load weights differently."""
    body = ("import time, common\n"
            "def quantize():\n"
            "    tmp = bytearray(300 * 2**20)  # zero-filled and touched: private pages\n"
            "    time.sleep(0.5)\n"
            "    del tmp\n"
            "def run(job, out):\n"
            "    common.timed(quantize)\n"
            "    return {'quantize_seconds': 0.0}\n"
            "common.main(run, 'fake')\n")
    _fake_tool(tmp_path, monkeypatch, body)
    rec = peers.run_peer("fake", "x", 3, 64, "m", tmp_path / "w.pt", tmp_path / "o", timeout=60)
    if rec["peak_anon_mb"] is None:
        pytest.skip("no RssAnon on this system")
    assert 300 < rec["peak_anon_mb"] < 600


def test_markdown_keeps_columns_for_error_rows():
    meta = {"model": "m", "nsamples": 2, "seqlen": 8, "windows_sha256": "ab" * 32, "eval_windows": 1,
            "kl_windows": 1, "tasks": ["t"], "zeroshot_limit": 5, "hardware": "cpu"}
    ok = peers.row_of("NeUQI+LDLQ", "neuqi", 3, 64, {
        "eval": {"ppl": {s: {"ppl": 10.0} for s in peers.SETS},
                 "kl": {peers.KL_SET: {"kl": 0.5, "top1_agreement": 0.8}}},
        "timing": {"quantize_seconds": 3.0, "distill_seconds": 2.0}})
    bad = peers.row_of("GPTQModel", "gptqmodel", 3, -1, None, "install failed: torch|cuda")
    lines = peers.markdown([ok, bad], meta).splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    assert len({ln.count("|") for ln in table}) == 1
    assert "| 5 |" in table[2]  # quantize + distill seconds
    assert "failed: install failed: torch/cuda" in table[3]


def test_hqq_runner_writes_a_quantized_dense_model(tmp_path):
    pytest.importorskip("hqq")
    hqq_run = _load("hqq_run", BENCH / "peer_tools" / "hqq_run.py")
    model_dir = make_tiny_model(tmp_path / "tiny")
    job = {"model": str(model_dir), "bits": 3, "group_size": 32, "variant": "hqq", "out": str(tmp_path / "o")}
    rec = hqq_run.run(job, tmp_path / "o")
    assert rec["linears"] == 14
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model", dtype=torch.float32)
    w_fp = fp.model.layers[0].mlp.down_proj.weight.detach()
    w_q = q.model.layers[0].mlp.down_proj.weight.detach()
    common.check_levels({"down": w_q}, 3, 32)
    rel = float((w_q - w_fp).norm() / w_fp.norm())
    assert 0.02 < rel < 0.5, rel  # changed by quantization, but close to the original
    assert json.dumps(rec)


def test_our_runs_are_measured_in_a_fresh_process(tmp_path, calib_file):
    """The run's peak RSS is its own, not the benchmark process's: ballast held here
    (as the bench holds the FP reference) must not show up in it."""
    from neuqi.pipeline.config import RunConfig

    ballast = torch.ones(2**30 // 4)  # 1 GB resident in this process
    model = make_tiny_model(tmp_path / "tiny", "llama")
    cfg = RunConfig(model=str(model), bits=3, group_size=32, method="ldlq", init="minmax",
                    calib=str(calib_file), nsamples=4, seqlen=32, out_dir=str(tmp_path / "runs"),
                    device="cpu")
    run_dir = peers.quantize_standalone(cfg)
    assert run_dir == tmp_path / "runs" / cfg.run_name and (run_dir / "result.json").exists()
    mem = json.loads((run_dir / "result.json").read_text())["memory"]
    parent_mb = process_memory_kb()["VmRSS"] / 1024
    assert mem["peak_rss_mb"] < parent_mb - 500 and float(ballast[0]) == 1.0
    bad = RunConfig(model=str(tmp_path / "missing"), out_dir=str(tmp_path / "runs"), device="cpu")
    with pytest.raises(RuntimeError, match="failed"):
        peers.quantize_standalone(bad)
