import pytest
import torch

from neuqi.quant import QuantParams, QuantSpec, dequantize, init_params, quantize


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_outside_2_to_8_are_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("g", [0, -2, -128])
def test_bad_group_sizes_are_rejected(g):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=3, group_size=g)


def test_partial_last_group_gets_its_own_parameters():
    spec = QuantSpec(3, 128)
    assert spec.n_groups(576) == 5
    g_idx = spec.group_index(576)
    assert g_idx[511] == 3 and g_idx[512] == 4 and g_idx[-1] == 4
    w = torch.randn(4, 576)
    params = init_params(w, spec, "minmax")
    assert params.scale.shape == (4, 5)
    # the partial group's range is its own 64 columns
    tail = w[:, 512:]
    assert torch.allclose(params.scale[:, 4], (tail.amax(1) - tail.amin(1)) / 7)


def test_codes_stay_in_range_and_dequantize_follows_the_convention():
    spec = QuantSpec(2, 4)
    w = torch.randn(3, 8) * 5
    params = QuantParams(torch.full((3, 2), 0.5), torch.full((3, 2), 1.3))
    q = quantize(w, params, spec)
    assert q.dtype == torch.uint8 and int(q.max()) <= 3
    expected = torch.clamp(torch.round(w / 0.5 + 1.3), 0, 3)
    assert torch.equal(q.float(), expected)
    assert torch.allclose(dequantize(q, params, spec), 0.5 * (expected - 1.3))


def test_nan_weights_raise_a_clear_error():
    w = torch.randn(4, 16)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        init_params(w, QuantSpec(3, 8), "neuqi")
