import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuqi.formats.packing import pack_rows, pack_weight, pack_zeros, unpack_rows, unpack_weight, unpack_zeros


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 100), m=st.integers(1, 7), seed=st.integers(0, 999))
def test_pack_unpack_round_trip(bits, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, m), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (((n + 31) // 32) * bits, m)
    assert torch.equal(unpack_rows(packed, bits, n).long(), codes)


def test_4bit_layout_is_gptq_order():
    codes = torch.arange(16).repeat(2)[:, None]  # 32 inputs, one output
    word = int(pack_rows(codes, 4)[0, 0]) & 0xFFFFFFFF
    assert word == sum(j << (4 * j) for j in range(8))


def test_3bit_values_straddle_words_like_gptq():
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b111  # bits 30..32 of the stream: two in word 0, one in word 1
    words = pack_rows(codes, 3)[:, 0].long() & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30, 0b1, 0]


def test_weight_and_zero_helpers_round_trip():
    codes = torch.randint(0, 8, (40, 70), dtype=torch.uint8)
    assert torch.equal(unpack_weight(pack_weight(codes, 3), 3, 70), codes)
    zeros = torch.randint(0, 8, (3, 40)).float()
    assert torch.equal(unpack_zeros(pack_zeros(zeros, 3), 3, 40).float(), zeros)


def test_codes_that_do_not_fit_are_rejected():
    with pytest.raises(ValueError, match="fit"):
        pack_rows(torch.tensor([[4]]), 2)
