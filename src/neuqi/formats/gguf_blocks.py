"""Byte layouts of llama.cpp's block-32 types: pack our codes and parameters into blocks.

The schema is ggml's (``ggml-common.h``): every block of 32 weights is

* ``Q4_0``: ``d`` fp16, 16 bytes of nibbles (``q[j] | q[j+16] << 4``), ``ŵ = d·(q − 8)``;
* ``Q4_1``: ``d``, ``m`` fp16, the same nibbles, ``ŵ = d·q + m``;
* ``Q5_0``: ``d``, 4 bytes ``qh`` (bit ``j`` = bit 4 of ``q[j]``, little-endian), nibbles,
  ``ŵ = d·(q − 16)``;
* ``Q5_1``: ``d``, ``m``, ``qh``, nibbles, ``ŵ = d·q + m``;
* ``Q8_0``: ``d`` fp16, 32 int8 ``q − 128``, ``ŵ = d·(q − 128)``.

``pack_blocks`` is the writer's half for these, ``pack_kquant_blocks`` for the
k-quants (below); ``unpack_blocks`` reads block-32 types back (round-trip tests), and
the ``gguf`` package's own dequantizer is the independent check of both.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from neuqi.quant.gguf_types import GGUFType

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def pack_blocks(codes: Tensor, d: Tensor, m: Tensor | None, t: GGUFType) -> np.ndarray:
    """``codes: [out, in]`` (0..maxq, already flipped where ``d < 0``), ``d, m: [out, in/32]``
    fp16-valued → ``uint8 [out, (in/32)·block_bytes]``, the tensor's rows as stored."""
    out, n_in = codes.shape
    t.check_row_length(n_in)
    nb = n_in // 32
    q = codes.cpu().numpy().astype(np.uint8).reshape(out * nb, 32)
    parts = [_f16_bytes(d.cpu().numpy().reshape(-1))]
    if t.asymmetric:
        if m is None:
            raise ValueError(f"{t.name} stores a min per block")
        parts.append(_f16_bytes(m.cpu().numpy().reshape(-1)))
    if t.bits == 8:
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if t.bits == 5:
            high = (q >> 4) & 1
            parts.append(np.packbits(high, axis=1, bitorder="little"))
        low = q & 0x0F
        parts.append(low[:, :16] | (low[:, 16:] << 4))
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == BLOCK_BYTES[t.name]
    return blocks.reshape(out, nb * BLOCK_BYTES[t.name])


def unpack_blocks(raw: np.ndarray, t: GGUFType) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inverse of :func:`pack_blocks`: ``(codes [out, in], d, m)`` (``m`` None if symmetric)."""
    out = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(-1, BLOCK_BYTES[t.name])
    nb = blocks.shape[0] // out
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(out, nb)
    pos = 2
    m = None
    if t.asymmetric:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(out, nb)
        pos = 4
    if t.bits == 8:
        q = blocks[:, pos:].view(np.int8).astype(np.int16) + 128
    else:
        high = np.zeros((blocks.shape[0], 32), dtype=np.uint8)
        if t.bits == 5:
            high = np.unpackbits(blocks[:, pos : pos + 4], axis=1, bitorder="little") << 4
            pos += 4
        qs = blocks[:, pos : pos + 16]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1) | high
    codes = torch.from_numpy(q.astype(np.uint8).reshape(out, nb * 32))
    return codes, torch.from_numpy(d), None if m is None else torch.from_numpy(m)


# ---------------------------------------------------------------------- k-quants
# ggml-common.h, super-blocks of 256 weights.  ``p`` is a weight's position in its
# super-block; codes are unsigned (0..maxq), sub-block scales the signed ``k``.
#
# * ``Q2_K`` (84 B): scales[16] = k | m << 4, qs[64] (p = 128h + 32j + r → byte 32h + r,
#   bits 2j), d, dmin;  ŵ = d·k·q − dmin·m.
# * ``Q3_K`` (110 B): hmask[32] (bit 2 of q at byte p % 32, bit p // 32), qs[64] as Q2_K,
#   scales[12] (6-bit k + 32: low nibbles in bytes 0..7, top two bits in bytes 8..11),
#   d;  ŵ = d·k·(q − 4).
# * ``Q4_K`` (144 B): d, dmin, scales[12] (6-bit k and m, see _pack_k4_scales), qs[128]
#   (p = 64c + 32h + l → byte 32c + l, nibble h);  ŵ = d·k·q − dmin·m.
# * ``Q5_K`` (176 B): as Q4_K plus qh[32] (bit 4 of q at byte p % 32, bit p // 32).
# * ``Q6_K`` (210 B): ql[128] (p = 128n + 32k + l → byte 64n + 32(k % 2) + l, nibble
#   k // 2), qh[64] (bits 4-5 at byte 32n + l, bits 2k), scales[16] int8, d;
#   ŵ = d·k·(q − 32).
KQUANT_BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _bits_at(x: np.ndarray, axis: int, width: int) -> np.ndarray:
    """Pack the values of ``x`` along ``axis`` into one byte, ``width`` bits each."""
    shifts = (np.arange(x.shape[axis], dtype=np.uint8) * width).reshape(
        [-1 if a == axis % x.ndim else 1 for a in range(x.ndim)])
    return np.bitwise_or.reduce(x.astype(np.uint8) << shifts, axis=axis).astype(np.uint8)


def _high_bit_plane(q: np.ndarray, bit: int) -> np.ndarray:
    """``[N, 256]`` codes → ``[N, 32]`` bytes: bit ``bit`` of weight p at byte p % 32, bit p // 32."""
    return _bits_at(((q >> bit) & 1).reshape(-1, 8, 32), axis=1, width=1)


def _two_bit_plane(q: np.ndarray) -> np.ndarray:
    """Low two bits of ``[N, 256]`` codes as ggml's ``qs[64]`` (Q2_K/Q3_K)."""
    return _bits_at((q & 3).reshape(-1, 2, 4, 32), axis=2, width=2).reshape(-1, 64)


def _pack_k4_scales(k: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``[N, 8]`` → ggml's 12 bytes (get_scale_min_k4's inverse)."""
    out = np.empty((k.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (k[:, :4] & 63) | ((k[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (k[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _pack_q3_scales(s: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit unsigned scales ``[N, 16]`` → Q3_K's 12 bytes."""
    low = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
    high = _bits_at(((s >> 4) & 3).reshape(-1, 4, 4), axis=1, width=2)
    return np.concatenate([low, high], axis=1).astype(np.uint8)


def pack_kquant_blocks(codes: Tensor, fields, t: GGUFType) -> np.ndarray:
    """``codes: [out, in]`` (0..maxq, flipped where ``fields.flip``) and the super-block
    fields (:class:`neuqi.quant.kquants.KQuantFields`) → ``uint8 [out, (in/256)·bytes]``."""
    out, n_in = codes.shape
    t.check_row_length(n_in)
    q = codes.cpu().numpy().astype(np.uint8).reshape(-1, 256)
    n = q.shape[0]

    def f16(x: Tensor) -> np.ndarray:
        return _f16_bytes(x.cpu().numpy().reshape(-1))

    d = f16(fields.d)
    k = fields.k.cpu().numpy().reshape(n, -1).astype(np.int16)
    m = fields.m.cpu().numpy().reshape(n, -1).astype(np.int16)
    if t.name == "Q2_K":
        parts = [(k | (m << 4)).astype(np.uint8), _two_bit_plane(q), d, f16(fields.dmin)]
    elif t.name == "Q3_K":
        parts = [_high_bit_plane(q, 2), _two_bit_plane(q), _pack_q3_scales((k + 32).astype(np.uint8)), d]
    elif t.name in ("Q4_K", "Q5_K"):
        parts = [d, f16(fields.dmin), _pack_k4_scales(k.astype(np.uint8), m.astype(np.uint8))]
        if t.name == "Q5_K":
            parts.append(_high_bit_plane(q, 4))
        nib = (q & 15).reshape(n, 4, 2, 32)
        parts.append((nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(n, 128))
    elif t.name == "Q6_K":
        q4 = q.reshape(n, 2, 4, 32)
        low = q4 & 15
        ql = low[:, :, :2] | (low[:, :, 2:] << 4)  # [n, half, k % 2, 32]
        qh = _bits_at((q4 >> 4) & 3, axis=2, width=2)  # [n, half, 32]
        parts = [ql.reshape(n, 128), qh.reshape(n, 64), k.astype(np.int8).view(np.uint8), d]
    else:
        raise ValueError(f"{t.name} is not a k-quant type")
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == KQUANT_BLOCK_BYTES[t.name], (t.name, blocks.shape)
    return blocks.reshape(out, (n_in // 256) * KQUANT_BLOCK_BYTES[t.name])
