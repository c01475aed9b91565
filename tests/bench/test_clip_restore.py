"""bench/clip_restore.py: which weights count as clipped, and the restored variants."""

import importlib.util
from pathlib import Path

import torch

from neuqi.formats.checkpoint import load_quantized
from neuqi.formats.packing import pack_weight
from neuqi.formats.qlinear import QuantLinear
from neuqi.models.loading import load_model
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model
from tests.conftest import make_tiny_model

BENCH = Path(__file__).resolve().parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("clip_restore", BENCH / "clip_restore.py")
clip_restore = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clip_restore)


def _qlinear(codes: torch.Tensor, scale: float, zero: float) -> QuantLinear:
    out, n_in = codes.shape
    q = QuantLinear(n_in, out, bits=2, group_size=-1)
    q.qweight.copy_(pack_weight(codes, 2))
    q.scales.fill_(scale)
    q.zeros.fill_(zero)
    return q


def test_only_weights_beyond_the_grid_end_count_as_clipped():
    codes = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=torch.uint8)
    q = _qlinear(codes, scale=0.5, zero=1.5)  # levels -0.75, -0.25, 0.25, 0.75
    w = q.dequantize().clone()
    w[0, 0] = -2.0   # code 0, 2.5 steps below the grid: clipped
    w[0, 3] = 1.1    # code 3, 0.7 steps above: within the margin
    w[1, 0] = 2.0    # code 3, 2.5 steps above: clipped
    w[1, 1] = 1.5    # 2.5 steps off but an inner code (error feedback), not clipping
    w[1, 3] = 0.3    # code 0 (-0.75), 2.1 steps off on the inner side: not clipping
    clipped, err = clip_restore.clipped_mask(q, w, steps=1.0)
    expected = torch.zeros_like(clipped)
    expected[0, 0] = expected[1, 0] = True
    assert torch.equal(clipped, expected)
    control = clip_restore.control_mask(clipped, err)
    assert int(control.sum()) == 2 and not (control & clipped).any()
    assert bool(control[1, 1]) and bool(control[1, 3])  # the two largest other errors


def test_variants_restore_exactly_the_masked_weights(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 97} and {i % 13} more" for i in range(4000)))
    fp = make_tiny_model(tmp_path / "tiny", "llama")
    cfg = RunConfig(model=str(fp), bits=2, group_size=-1, calib=str(calib), nsamples=4,
                    seqlen=64, out_dir=str(tmp_path / "runs"), device="cpu")
    run = quantize_model(cfg, quiet=True)
    variants, counts = clip_restore.dense_variants(run, fp, steps=1.0)
    qmodel, fp_state = load_quantized(run), load_model(fp).state_dict()
    assert counts["weights"] == sum(t.numel() for t in variants["as quantized"].values())
    n_restored = n_control = 0
    for name, deq in variants["as quantized"].items():
        torch.testing.assert_close(deq, qmodel.get_submodule(name).dequantize())
        w_fp = fp_state[f"{name}.weight"].float()
        for label in ("clipped restored", "control restored"):
            v = variants[label][name]
            changed = v != deq
            assert torch.equal(v[changed], w_fp[changed])
        restored = variants["clipped restored"][name] != deq
        n_restored += int(restored.sum())
        n_control += int((variants["control restored"][name] != deq).sum())
    assert n_restored == counts["clipped"] > 0  # 2-bit channel-wise search clips on this model
    assert n_control == n_restored
