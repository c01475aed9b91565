"""ggml block layouts: our packer against the ``gguf`` package's own dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuqi.formats.gguf_blocks import BLOCK_BYTES, pack_blocks, unpack_blocks
from neuqi.quant.gguf_types import GGUF_TYPES

gguf = pytest.importorskip("gguf")


def _random_fields(t, out: int, nb: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, t.maxq + 1, (out, nb * 32), generator=g, dtype=torch.int64).to(torch.uint8)
    d = (torch.randn(out, nb, generator=g) * 0.05).half().float()
    if not t.asymmetric:  # symmetric blocks may carry a negative step (flipped codes)
        d = torch.where(torch.rand(out, nb, generator=g) < 0.5, -d, d)
    m = (torch.randn(out, nb, generator=g) * 0.2).half().float() if t.asymmetric else None
    return codes, d, m


def _expected(codes, d, m, t) -> np.ndarray:
    q = codes.float().reshape(codes.shape[0], -1, 32)
    w = q * d[..., None] + m[..., None] if t.asymmetric else (q - t.centre) * d[..., None]
    return w.reshape(codes.shape).numpy()


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(list(GGUF_TYPES)),
    out=st.integers(1, 7),
    nb=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_pack_round_trips_and_gguf_dequantizes_bit_exact(name: str, out: int, nb: int, seed: int) -> None:
    t = GGUF_TYPES[name]
    codes, d, m = _random_fields(t, out, nb, seed)
    raw = pack_blocks(codes, d, m, t)
    assert raw.shape == (out, nb * BLOCK_BYTES[name]) and raw.dtype == np.uint8
    c2, d2, m2 = unpack_blocks(raw, t)
    assert torch.equal(c2, codes) and torch.equal(d2, d)
    assert (m2 is None) == (m is None) and (m is None or torch.equal(m2, m))
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, name))
    np.testing.assert_array_equal(ref.astype(np.float32), _expected(codes, d, m, t))


def test_pack_refuses_bad_rows() -> None:
    t = GGUF_TYPES["Q4_1"]
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_blocks(torch.zeros(2, 40, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), t)
    with pytest.raises(ValueError, match="min per block"):
        pack_blocks(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 1), None, t)
