"""The quantization toolkit: known values, edge cases, and bit-exact agreement with bitsandbytes."""
import pytest
import torch

from qlora.quantization import (FP4_CODE, NF4_CODE, affine_params, dynamic_tree_code, error_stats,
                                normal_float_code, quantize_4bit, quantize_affine, quantize_log,
                                quantize_symmetric)


def test_affine_scale_and_zero_point_by_hand():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    q = quantize_affine(x, bits=8)
    # S = (2 - (-1)) / 255, Z = round(0 - (-1) / S) = round(85) = 85
    assert q.scale.item() == pytest.approx(3 / 255, rel=1e-6)
    assert q.zero_point.item() == 85
    assert q.codes.reshape(-1).tolist() == [0, 85, 128, 255]
    assert q.dequantize()[1].item() == 0.0  # zero is exact
    assert (q.dequantize() - x).abs().max() <= q.scale.item() / 2 + 1e-7


@pytest.mark.parametrize("x", [torch.full((5,), 3.0), torch.zeros(4), torch.tensor([-2.0, -1.0, -0.5]),
                               torch.tensor([0.5, 1.0, 4.0])], ids=["constant", "zeros", "negative", "positive"])
def test_affine_edge_cases_round_trip_within_half_a_step(x):
    q = quantize_affine(x, bits=8)
    assert torch.isfinite(q.dequantize()).all()
    assert (q.dequantize() - x).abs().max() <= q.scale.max().item() / 2 + 1e-6
    assert 0 <= int(q.zero_point.item()) <= 255


def test_int4_ranges_and_granularity():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    w[0] *= 50  # one loud channel
    per_tensor = quantize_affine(w, bits=4)
    per_channel = quantize_affine(w, bits=4, granularity="channel")
    assert per_tensor.codes.max() <= 15 and per_tensor.codes.min() >= 0
    assert error_stats(w[1:], per_channel.dequantize()[1:])["mse"] < \
        error_stats(w[1:], per_tensor.dequantize()[1:])["mse"] / 10
    s = quantize_symmetric(w, bits=4, granularity="block", block=32)
    assert s.codes.min() >= -7 and s.codes.max() <= 7 and s.scale.numel() == 8 * 128 // 32


def test_symmetric_known_values():
    q = quantize_symmetric(torch.tensor([-1.0, 0.25, 1.0]), bits=8)
    assert q.scale.item() == pytest.approx(1 / 127, rel=1e-6) and q.codes.reshape(-1).tolist() == [-127, 32, 127]


def test_log_quantization_gives_signed_powers_of_two():
    x = torch.tensor([3.0, -0.3, 0.001, 0.0, 1.0])
    y = quantize_log(x, bits=4)
    assert y.tolist() == [4.0, -0.25, 0.0, 0.0, 1.0]


def test_calibration_helps_with_an_outlier():
    torch.manual_seed(0)
    x = torch.randn(4096)
    x[0] = 40.0
    plain = error_stats(x[1:], quantize_affine(x, bits=4).dequantize()[1:])["mse"]
    for method in ("percentile", "mse"):
        clipped = error_stats(x[1:], quantize_affine(x, bits=4, calibration=method).dequantize()[1:])["mse"]
        assert clipped < plain / 5, method


def test_nf4_code_is_the_normal_quantiles():
    assert torch.allclose(normal_float_code(), NF4_CODE, atol=2e-7)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 256), (33, 77)], ids=["even", "ragged"])
def test_4bit_matches_bitsandbytes_bit_for_bit(kind, double_quant, shape):
    import bitsandbytes.functional as F

    torch.manual_seed(1)
    w = torch.randn(*shape) * 0.02
    ours = quantize_4bit(w, kind, block=64, double_quant=double_quant)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=double_quant)
    theirs = F.dequantize_4bit(packed, state)
    if not double_quant:
        assert torch.equal(ours.dequantize(), theirs)
        # and the packed bytes: two codes per byte, the first in the high nibble
        if kind == "nf4":
            zero = 7  # an odd count is padded with the code of 0.0
            codes = torch.nn.functional.pad(ours.codes, (0, ours.codes.numel() % 2), value=zero)
            assert torch.equal((codes[::2] << 4) | codes[1::2], packed.reshape(-1))
    else:
        # bitsandbytes' CPU library finds the 8-bit absmax code with an approximate binary search, which
        # in rare near-ties picks the second-nearest code; ours is the exact nearest (its torch path's rule)
        same = (ours.dequantize() == theirs).float().mean().item()
        assert same > 0.99, same


def test_double_quant_code_and_bits_per_parameter():
    import bitsandbytes.functional as F

    assert torch.equal(dynamic_tree_code(), F.create_dynamic_map(signed=True).sort().values)
    w = torch.randn(4096, 4096)
    assert quantize_4bit(w[:64], double_quant=False).bits_per_parameter() == pytest.approx(4.5)
    assert quantize_4bit(w, double_quant=True).bits_per_parameter() == pytest.approx(4.127, abs=1e-3)


def test_fp4_code_has_fifteen_distinct_values():
    assert FP4_CODE.numel() == 15 and FP4_CODE.max() == 1.0 and (FP4_CODE == 0).sum() == 1


def test_affine_params_handles_an_empty_range():
    s, z = affine_params(torch.tensor([0.0]), torch.tensor([0.0]), 8)
    assert s.item() == 1.0 and z.item() == 0
