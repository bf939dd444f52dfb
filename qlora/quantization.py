"""The quantization math of the seed article, plainly on torch tensors.

Every scheme maps a float tensor to integer codes plus the little it needs to map them back
(scales, zero-points, codebooks), at one of three granularities: the whole tensor, each output
channel (row), or blocks of `block` consecutive values.

- affine (asymmetric, min-max):  S = (x_max - x_min) / (q_max - q_min),  Z = round(q_min - x_min / S)
  clamped to [q_min, q_max];  q = clamp(round(x / S + Z), q_min, q_max);  x^ = S (q - Z).
  The article leaves Z unrounded. Here Z is an integer and the range always includes 0, so 0.0 is
  exactly representable (q = Z): zero padding and ReLU zeros survive quantization. That choice
  costs nothing measurable and is what integer kernels need.
- symmetric absmax:  S = max|x| / q_max,  q = clamp(round(x / S), -q_max, q_max).
- logarithmic: sign and a power of two, x^ = sign(x) 2^e, e = round(log2 |x|) clamped to the
  2^(bits-1) - 1 exponents below the largest; one code is kept for zero.
- codebook schemes (NF4, FP4): blockwise absmax scaling to [-1, 1], then the nearest of 16 values.
  NF4's values are the quantiles of a standard normal (QLoRA), so each code is used equally often
  by normally distributed weights. Double quantization stores the per-block absmax in 8 bits
  (blocks of 256, after subtracting their mean) with the dynamic tree code. Both reproduce
  bitsandbytes exactly (tests/unit/test_quantization.py).
- calibration: the range (x_min, x_max or absmax) can be clipped at a percentile of |x|, or at the
  clip value that minimises the mean squared error, trading a few large errors on outliers for
  a finer grid everywhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

# The NF4 code of QLoRA (Dettmers et al. 2023, appendix): 7 negative and 8 positive normal quantiles,
# normalised to [-1, 1], with an exact zero. Fixed float32 values, as published.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) values, normalised by the largest (12).
FP4_CODE = torch.tensor(sorted({s * v / 12 for v in (0, 0.0625, 2, 3, 4, 6, 8, 12) for s in (1, -1)}))


def normal_float_code(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 derived from its definition: quantiles of N(0, 1) at evenly spaced probabilities from
    `offset` down to 0.5 (8 positive, 7 negative) and zero, divided by the largest."""
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (values / values.abs().max()).float()


def dynamic_tree_code(exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit dynamic tree code (Dettmers 2015) bitsandbytes uses for double quantization.

    Exponent i (0..exponent_bits-1) scales the midpoints of an even grid on [0.1, 1] by
    10^(i - exponent_bits + 1); the grid gets finer as the exponent grows. Plus 0 and 1."""
    values = []
    mantissa_bits = total_bits - 1
    for i in range(exponent_bits):
        grid = torch.linspace(0.1, 1, 2 ** (i + mantissa_bits - exponent_bits) + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (i - exponent_bits + 1)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    extra = 2 ** (mantissa_bits - exponent_bits) - 1
    if extra > 0:  # only when there are fewer exponent bits than mantissa bits
        grid = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        values += (mids * 10 ** (i - exponent_bits + 1)).tolist() + (-mids * 10 ** (i - exponent_bits + 1)).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


# ------------------------------------------------------------------------------------- granularity

def _groups(x: torch.Tensor, granularity: str, block: int) -> torch.Tensor:
    """x as a 2-D view: one row per group sharing a scale (tensor: 1 row; channel: x's rows;
    block: consecutive `block` values, the last block zero-padded)."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.reshape(x.shape[0], -1)
    if granularity == "block":
        flat = x.reshape(-1)
        pad = (-flat.numel()) % block
        return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    raise ValueError(f"granularity must be tensor, channel or block, not {granularity!r}")


def _ungroup(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return g.reshape(-1)[: math.prod(shape)].reshape(shape)


# ---------------------------------------------------------------------------------------- calibration

def clip_range(g: torch.Tensor, method: Optional[str], percentile: float = 99.9,
               fake_quant: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group (low, high) of the quantization range: min/max, a percentile of |x|, or the
    MSE-optimal symmetric clip found on a grid of 50 fractions of max|x|."""
    lo, hi = g.min(dim=1).values, g.max(dim=1).values
    if method is None or method == "minmax":
        return lo, hi
    amax = g.abs().max(dim=1).values
    if method == "percentile":
        c = torch.quantile(g.abs().float(), percentile / 100, dim=1)
        return torch.maximum(lo, -c), torch.minimum(hi, c)
    if method == "mse":
        best_err = torch.full_like(amax, float("inf"))
        best = amax.clone()
        for frac in torch.linspace(0.3, 1.0, 50):
            c = amax * frac
            lo_c, hi_c = torch.maximum(lo, -c), torch.minimum(hi, c)
            err = ((fake_quant(g, lo_c, hi_c) - g) ** 2).mean(dim=1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, c, best)
        return torch.maximum(lo, -best), torch.minimum(hi, best)
    raise ValueError(f"calibration must be minmax, percentile or mse, not {method!r}")


# ----------------------------------------------------------------------------------- uniform schemes

@dataclass
class Quantized:
    """Integer codes and what maps them back; `dequantize()` gives x^ in x's shape."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    shape: torch.Size
    granularity: str
    block: int
    bits: int
    scheme: str

    def dequantize(self) -> torch.Tensor:
        z = self.zero_point if self.zero_point is not None else 0
        g = self.scale[:, None] * (self.codes.float() - (z[:, None] if torch.is_tensor(z) else z))
        return _ungroup(g, self.shape)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point of unsigned `bits`-bit affine quantization of [lo, hi].

    The range is widened to include 0, and an empty range (x_min == x_max == 0) gets scale 1."""
    q_min, q_max = 0, 2 ** bits - 1
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = (hi - lo) / (q_max - q_min)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(q_min - lo / scale), q_min, q_max)
    return scale, zero


def quantize_affine(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", block: int = 64,
                    calibration: Optional[str] = None, percentile: float = 99.9) -> Quantized:
    """Asymmetric min-max quantization to unsigned `bits`-bit integers."""
    g = _groups(x.float(), granularity, block)
    q_max = 2 ** bits - 1

    def fake(gr, lo, hi):
        s, z = affine_params(lo, hi, bits)
        return s[:, None] * (torch.clamp(torch.round(gr / s[:, None] + z[:, None]), 0, q_max) - z[:, None])

    lo, hi = clip_range(g, calibration, percentile, fake)
    scale, zero = affine_params(lo, hi, bits)
    codes = torch.clamp(torch.round(g / scale[:, None] + zero[:, None]), 0, q_max)
    dtype = torch.uint8 if bits <= 8 else torch.int32
    return Quantized(codes.to(dtype), scale, zero, x.shape, granularity, block, bits, "affine")


def quantize_symmetric(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", block: int = 64,
                       calibration: Optional[str] = None, percentile: float = 99.9) -> Quantized:
    """Symmetric absmax quantization to signed integers in [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    g = _groups(x.float(), granularity, block)
    q_max = 2 ** (bits - 1) - 1

    def scale_of(amax):
        return torch.where(amax > 0, amax / q_max, torch.ones_like(amax))

    def fake(gr, lo, hi):
        s = scale_of(torch.maximum(-lo, hi))
        return s[:, None] * torch.clamp(torch.round(gr / s[:, None]), -q_max, q_max)

    lo, hi = clip_range(g, calibration, percentile, fake)
    scale = scale_of(torch.maximum(-lo, hi))
    codes = torch.clamp(torch.round(g / scale[:, None]), -q_max, q_max)
    return Quantized(codes.to(torch.int8 if bits <= 8 else torch.int32), scale, None, x.shape,
                     granularity, block, bits, "symmetric")


def quantize_log(x: torch.Tensor, bits: int = 4, granularity: str = "tensor", block: int = 64) -> torch.Tensor:
    """Logarithmic quantization (returns x^): sign and a power of two, 2^(bits-1) - 1 exponents
    counted down from the group's largest, and zero below the smallest."""
    g = _groups(x.float(), granularity, block)
    levels = 2 ** (bits - 1) - 1
    top = torch.ceil(torch.log2(g.abs().max(dim=1).values.clamp(min=1e-30)))[:, None]
    e = torch.round(torch.log2(g.abs().clamp(min=1e-30)))
    e = torch.minimum(e, top)
    out = torch.sign(g) * torch.pow(2.0, e)
    out = torch.where(e < top - levels + 1, torch.zeros_like(out), out)  # below the smallest level
    return _ungroup(out, x.shape)


# ----------------------------------------------------------------------------------- codebook schemes

@dataclass
class Quantized4bit:
    """Blockwise 4-bit codes (indices into `code`), absmax per block (or its 8-bit double quant)."""
    codes: torch.Tensor  # uint8 in [0, 15], one per value (not packed)
    absmax: torch.Tensor  # float32 per block; with double quant, the values it dequantizes to
    code: torch.Tensor
    shape: torch.Size
    block: int
    double_quant: Optional[Dict[str, torch.Tensor]] = None

    def dequantize(self) -> torch.Tensor:
        return expand_blocks(self.code[self.codes.long()], self.absmax, self.block).reshape(self.shape)

    def bits_per_parameter(self) -> float:
        n = math.prod(self.shape)
        if self.double_quant is None:
            return (4 * n + 32 * self.absmax.numel()) / n
        dq = self.double_quant
        return (4 * n + 8 * dq["codes"].numel() + 32 * dq["absmax"].numel() + 32) / n


def nearest_code(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (code sorted ascending); ties go to the larger value."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(values, bounds, out_int32=True).to(torch.uint8)


def blockwise_absmax(x: torch.Tensor, code: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): each block scaled by its largest |value| into [-1, 1], then coded.

    Full blocks are multiplied by 1/absmax and a last, short block divided by its own absmax,
    as bitsandbytes does (the two round differently in the last bit)."""
    flat = x.reshape(-1).float()
    full = flat.numel() - flat.numel() % block
    g = flat[:full].reshape(-1, block)
    absmax = g.abs().max(dim=1).values
    scaled = torch.clamp(g * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < flat.numel():
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return nearest_code(scaled, code), absmax


def expand_blocks(values: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """values (flat) times their block's absmax; the last block may be short."""
    full = values.numel() - values.numel() % block
    out = (values[:full].reshape(-1, block) * absmax[: full // block, None]).reshape(-1)
    if full < values.numel():
        out = torch.cat([out, values[full:] * absmax[-1]])
    return out


def quantize_4bit(x: torch.Tensor, kind: str = "nf4", block: int = 64, double_quant: bool = False,
                  dq_block: int = 256) -> Quantized4bit:
    """NF4 or FP4 blockwise quantization, optionally with double quantization of the absmax."""
    code = {"nf4": NF4_CODE, "fp4": FP4_CODE}[kind]
    codes, absmax = blockwise_absmax(x, code, block)
    dq = None
    if double_quant:
        offset = absmax.mean()
        tree = dynamic_tree_code()
        q_abs, abs_of_abs = blockwise_absmax(absmax - offset, tree, dq_block)
        dq = {"codes": q_abs, "absmax": abs_of_abs, "offset": offset}
        absmax = expand_blocks(tree[q_abs.long()], abs_of_abs, dq_block) + offset
    return Quantized4bit(codes, absmax, code, x.shape, block, dq)


# ------------------------------------------------------------------------------------------- errors

def error_stats(x: torch.Tensor, x_hat: torch.Tensor) -> Dict[str, float]:
    """MSE, max |error| and SQNR (dB: signal power over error power)."""
    x, x_hat = x.float(), x_hat.float()
    err = x - x_hat
    mse = float((err ** 2).mean())
    signal = float((x ** 2).mean())
    sqnr = 10 * math.log10(signal / mse) if mse > 0 else float("inf")
    return {"mse": mse, "max_abs_error": float(err.abs().max()), "sqnr_db": sqnr}


def bits_uniform(q: Quantized) -> float:
    """Bits per parameter of a uniform scheme: the codes plus fp32 scale (and zero-point) per group."""
    n = math.prod(q.shape)
    per_group = 32 + (8 if q.zero_point is not None else 0)
    return (q.bits * n + per_group * q.scale.numel()) / n
