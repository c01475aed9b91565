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


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes: [n, m]`` (values < 2^bits) along dim 0 → int32 ``[ceil(n/32)·bits, m]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, m = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    pad = (-n) % 32
    if pad:
        c = torch.cat([c, c.new_zeros(pad, m)])
    blocks = c.view(-1, 32, m)  # [B, 32, m]
    shifts = torch.arange(bits, device=c.device)
    bit = (blocks[:, :, None, :] >> shifts[None, None, :, None]) & 1  # [B, 32, bits, m]
    stream = bit.reshape(blocks.shape[0], bits, 32, m)  # bit k of the stream at [k//32, k%32]
    weights = (torch.ones(32, dtype=torch.int64, device=c.device) << torch.arange(32, device=c.device))
    words = (stream * weights[None, None, :, None]).sum(dim=2)  # [B, bits, m] in 0..2^32-1
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.reshape(-1, m).to(torch.int32)


def unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[ceil(n/32)·bits, m]`` → uint8 ``[n, m]``."""
    m = packed.shape[1]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(-1, bits, m)  # [B, bits, m]
    k = torch.arange(32, device=packed.device)
    stream = (words[:, :, None, :] >> k[None, None, :, None]) & 1  # [B, bits, 32, m]
    bit = stream.reshape(words.shape[0], 32, bits, m)
    vals = (bit << torch.arange(bits, device=packed.device)[None, None, :, None]).sum(dim=2)
    return vals.reshape(-1, m)[:n].to(torch.uint8)


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
