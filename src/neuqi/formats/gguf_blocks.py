"""Byte layouts of llama.cpp's block-32 types: pack our codes and parameters into blocks.

The schema is ggml's (``ggml-common.h``): every block of 32 weights is

* ``Q4_0``: ``d`` fp16, 16 bytes of nibbles (``q[j] | q[j+16] << 4``), ``ŵ = d·(q − 8)``;
* ``Q4_1``: ``d``, ``m`` fp16, the same nibbles, ``ŵ = d·q + m``;
* ``Q5_0``: ``d``, 4 bytes ``qh`` (bit ``j`` = bit 4 of ``q[j]``, little-endian), nibbles,
  ``ŵ = d·(q − 16)``;
* ``Q5_1``: ``d``, ``m``, ``qh``, nibbles, ``ŵ = d·q + m``;
* ``Q8_0``: ``d`` fp16, 32 int8 ``q − 128``, ``ŵ = d·(q − 128)``.

``pack_blocks`` is the writer's half; ``unpack_blocks`` reads them back (round-trip
tests), and the ``gguf`` package's own dequantizer is the independent check.
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
