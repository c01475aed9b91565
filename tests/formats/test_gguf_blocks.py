"""ggml block layouts: our packer against the ``gguf`` package's own dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuqi.formats.gguf_blocks import (
    BLOCK_BYTES,
    KQUANT_BLOCK_BYTES,
    pack_blocks,
    pack_kquant_blocks,
    unpack_blocks,
)
from neuqi.quant.gguf_types import BLOCK32_TYPES, GGUF_TYPES, KQUANT_TYPES
from neuqi.quant.kquants import KQuantFields, scale_levels

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
    name=st.sampled_from(BLOCK32_TYPES),
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


def _random_kquant(t, out: int, ns: int, seed: int) -> tuple[torch.Tensor, KQuantFields]:
    """Random codes and every stored field over its whole range (signed scales, flips)."""
    g = torch.Generator().manual_seed(seed)
    ng = ns * t.subs
    codes = torch.randint(0, t.maxq + 1, (out, ng * t.block), generator=g).to(torch.uint8)
    d = (torch.rand(out, ns, generator=g) * 0.01 + 1e-4).half().float()
    k_pos, k_neg = scale_levels(t)
    if t.asymmetric:
        k = torch.randint(0, k_pos + 1, (out, ng), generator=g).float()
        m = torch.randint(0, k_pos + 1, (out, ng), generator=g).float()
        dmin = (torch.rand(out, ns, generator=g) * 0.01).half().float()
        flip = torch.zeros(out, ng, dtype=torch.bool)
    else:
        k = torch.randint(-k_neg, k_pos + 1, (out, ng), generator=g).float()
        m, dmin, flip = torch.zeros(out, ng), torch.zeros(out, ns), k < 0
    return codes, KQuantFields(d, dmin, k, m, flip)


def _kquant_expected(codes, f: KQuantFields, t) -> np.ndarray:
    """ggml's formula: ``d·k·q − dmin·m`` or ``d·k·(q − c)``, per sub-block, float32."""
    out = codes.shape[0]
    q = codes.float().reshape(out, -1, t.block)
    dk = (f.d.repeat_interleave(t.subs, dim=1) * f.k)[..., None]
    if t.asymmetric:
        w = dk * q - (f.dmin.repeat_interleave(t.subs, dim=1) * f.m)[..., None]
    else:
        w = dk * (q - t.centre)
    return w.reshape(codes.shape).numpy()


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(KQUANT_TYPES),
    out=st.integers(1, 4),
    ns=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_kquant_pack_is_what_gguf_dequantizes(name: str, out: int, ns: int, seed: int) -> None:
    t = GGUF_TYPES[name]
    codes, f = _random_kquant(t, out, ns, seed)
    raw = pack_kquant_blocks(codes, f, t)
    assert raw.shape == (out, ns * KQUANT_BLOCK_BYTES[name]) and raw.dtype == np.uint8
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, name))
    np.testing.assert_array_equal(ref.astype(np.float32).reshape(out, -1), _kquant_expected(codes, f, t))


def test_kquant_pack_refuses_bad_rows() -> None:
    t = GGUF_TYPES["Q4_K"]
    codes, f = _random_kquant(t, 2, 1, 0)
    with pytest.raises(ValueError, match="multiple of 256"):
        pack_kquant_blocks(codes[:, :128], f, t)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dense_tensors_at_a_kquant_decode_to_round_to_nearest_on_llamacpps_reference_grid(name):
    """Embeddings / output heads of a mix (e.g. Q4_K_M's Q6_K head): the gguf package
    cannot quantize k-quants, so neuqi writes them; its decoder must read them back."""
    from neuqi.formats.export.gguf import _dense_payload
    from neuqi.quant.gguf_types import gguf_params, gguf_type
    from neuqi.quant.grid import fake_quantize

    w = torch.randn(6, 512) * torch.rand(6, 1)
    data, qtype = _dense_payload(w.numpy(), name)
    back = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))
    t = gguf_type(name)
    expected = fake_quantize(w, gguf_params(w, t, "minmax"), t.spec)
    assert torch.equal(back, expected)
    assert ((back - w).pow(2).sum() / w.pow(2).sum()) < 0.2  # a quantized copy, not noise
