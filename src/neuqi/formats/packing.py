"""Bit packing of integer codes into int32 words (GPTQ order).

Codes run along the input dimension: every 32 consecutive inputs form a
``32·bits``-bit little-endian bit stream stored in ``bits`` int32 words, so
``qweight: [ceil(in/32)·bits, out]``.  For 2/4/8 bits this is the familiar
"value j at shift bits·j"; for 3 bits values straddle words exactly as GPTQ's
3-bit layout does.  Zero-points pack the same way along the output dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _slots(bits: int) -> list[tuple[int, int, int]]:
    """Where value ``j`` of a 32-value block lives: ``(j, word, shift)``; a value with
    ``shift + bits > 32`` continues at bit 0 of ``word + 1`` (3-bit straddling)."""
    return [(j, *divmod(bits * j, 32)) for j in range(32)]


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes: [n, m]`` (values < 2^bits) along dim 0 → int32 ``[ceil(n/32)·bits, m]``.

    Each of the 32 positions of a block is shifted straight into its word(s), for all
    blocks and columns at once: temporaries stay at a few times the packed size (a
    per-bit expansion would be 64× the codes, and the pipeline packs every linear of
    a model back to back).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, m = codes.shape
    if codes.numel() and (float(codes.min()) < 0 or float(codes.max()) >= 1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    pad = (-n) % 32
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, m)])
    blocks = codes.view(-1, 32, m)
    words = torch.zeros(blocks.shape[0], bits, m, dtype=torch.int64, device=codes.device)
    for j, word, shift in _slots(bits):
        v = blocks[:, j].to(torch.int64)
        words[:, word] |= (v << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= v >> (32 - shift)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as signed int32
    return words.reshape(-1, m).to(torch.int32)


def unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[ceil(n/32)·bits, m]`` → uint8 ``[n, m]``."""
    m = packed.shape[1]
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(-1, bits, m)  # [B, bits, m]
    vals = torch.empty(words.shape[0], 32, m, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for j, word, shift in _slots(bits):
        v = words[:, word] >> shift
        if shift + bits > 32:
            v = v | (words[:, word + 1] << (32 - shift))
        vals[:, j] = v & mask
    return vals.reshape(-1, m)[:n]


def pack_weight(codes: Tensor, bits: int) -> Tensor:
    """``codes: [out, in]`` → ``qweight: [ceil(in/32)·bits, out]`` int32."""
    return pack_rows(codes.t(), bits)


def unpack_weight(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """``qweight`` → codes ``[out, in]`` uint8."""
    return unpack_rows(qweight, bits, in_features).t().contiguous()


def pack_zeros(zeros: Tensor, bits: int) -> Tensor:
    """Integer zero-points ``[n_groups, out]`` → ``qzeros: [n_groups, ceil(out/32)·bits]``."""
    return pack_rows(zeros.round().t(), bits).t().contiguous()


def unpack_zeros(qzeros: Tensor, bits: int, out_features: int) -> Tensor:
    return unpack_rows(qzeros.t().contiguous(), bits, out_features).t().contiguous()
