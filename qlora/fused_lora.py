"""A 4-bit layer and its LoRA as one autograd function (train.fused_lora: CPU training, GPUs on request).

PEFT computes a LoRA layer as `base(x).clone() + lora_B(lora_A(x)) * scaling`: bitsandbytes'
4-bit matmul, a copy of its output, two small matmuls, a scaling and a sum, each a separate
autograd node whose backward makes temporaries of its own (the scaled gradient, the input gradient
of the LoRA path, then their sum). On a CPU these memory passes cost as much as the small matmuls
themselves: for SmolLM2's layers the LoRA path added 36% to the 4-bit matmul's forward and
backward at 332 tokens, 48% at 1024.

Here the forward is y = x W^T, then y += s (x A^T) B^T in place; the backward forms the LoRA path's
input gradient in place on the base's: dx = g W, dx += (s g B) A. The products are the ones PEFT
computes, but those of rank r that PEFT lays out as (tokens x r), x A^T, g B and g^T h, are
computed as their transposes, (r x tokens): MKL runs these 1.2x (x A^T) to 4x (g^T h) faster on
SmolLM2's shapes, and the LoRA products of a forward and backward through its decoder take 20%
less time. Their sums may round otherwise, so the numbers are PEFT's to float rounding (1e-7). The
weight W is dequantized from 4 bits in the forward and again in the backward, as bitsandbytes
does; nothing of it is kept between them. With our dequantization kernel (train.fast_dequant) the
forward's x W^T and x A^T are one product, x [W; A]^T, the kernel writing W straight above A's r
rows: the rank-r product alone runs at a fraction of the base's FLOP rate, and the joint one
made a decoder pass of SmolLM2 about 1.03x faster (bench/fused_lora.py --joint).

On CPUs with bf16 units (AVX512-BF16; `train.bf16_base_products`, on there under auto) the base's
two products, x W^T and g W, run in bf16 (our kernel dequantizes W straight to bf16): these cores
multiply bf16 matrices at 2.2x their fp32 rate, and the products of the frozen 4-bit base are most
of a step. Everything else stays fp32: the activations, LoRA's products and the sums they are
added into, so LoRA's small outputs do not round away as they do in bf16 compute (which learned 72%
as much a step; bench/README.md). LoRA's gradients are formed from fp32 tensors; the layer's output
and input gradient carry the bf16 products' rounding. The same setting makes the one-pass LM head's
products in bf16 (qlora/one_pass_head.py).

On a GPU (`train.fused_lora=true`; `auto` leaves GPUs to PEFT until it is measured there) the same
function runs in the 16-bit compute dtype: the base product is bitsandbytes' own (`matmul_4bit`,
which picks its fused kernel or dequantization and cuBLAS by shape), LoRA's weights are cast to the
compute dtype as autocast would, and their gradients come back in fp32. What it saves there is
memory traffic: PEFT's copy of the base output, its scaling of the LoRA output and the sum each
pass over a (tokens x outputs) tensor, and the backward's scaling and sum of input gradients pass
over others; here the LoRA products add into the base's results within the GEMMs.

The layer falls back to PEFT's own forward for anything else: no gradient (evaluation,
generation), 16-bit tensors on CPU, an input in another dtype than the layer computes in (or than
autocast's), dropout, DoRA or other LoRA variants, more than one active adapter, a trained bias,
extra arguments, and on GPUs a graph being compiled.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch


class LoraMatmul4bit(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W held in 4 bits, in x's dtype; gradients for x, A and B.
    bf16_base: x W^T and the input gradient's g W multiplied in bf16 (CPU, fp32 x; above)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scaling, weight, bias, bf16_base=False):
        x2 = x.reshape(-1, x.shape[-1])
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # fp32 LoRA in 16-bit compute: autocast's cast
        y, h = _products(x2, weight, bias, A, bf16_base)
        y.addmm_(h, B.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, A, B)
        ctx.scaling, ctx.weight, ctx.lora_dtype, ctx.bf16_base = scaling, weight, lora_A.dtype, bf16_base
        # detached: to autograd a tensor of its own, not a view made in a custom function, on which
        # in-place ops (a model adding to a layer's output) are refused
        return y.view(*x.shape[:-1], y.shape[-1]).detach()

    @staticmethod
    def backward(ctx, grad):
        from qlora.dequant import dequantized

        x2, h, A, B = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        needs_x, needs_A, needs_B = ctx.needs_input_grad[:3]
        grad_h = torch.mm(B.t(), g.t()).t().mul_(ctx.scaling)  # g B, as (B^T g^T)^T
        grad_A = torch.mm(grad_h.t(), x2).to(ctx.lora_dtype) if needs_A else None
        grad_B = torch.mm(h.t(), g).t().mul_(ctx.scaling).to(ctx.lora_dtype) if needs_B else None  # g^T h, as (h^T g)^T
        grad_x = None
        if needs_x:
            dtype = torch.bfloat16 if ctx.bf16_base else g.dtype
            w = dequantized(ctx.weight, ctx.weight.quant_state, dtype)
            grad_x = torch.mm(g.to(dtype), w).to(g.dtype).addmm_(grad_h, A).view(*grad.shape[:-1], x2.shape[-1])
        return grad_x, grad_A, grad_B, None, None, None, None


def _products(x2, weight, bias, A, bf16_base=False):
    """x W^T + b and x A^T for a 2-D input; the base product as bitsandbytes computes it without
    gradient, in bf16 under bf16_base, or on CPU within fast_dequant both as one product of x and
    [W; A] (above)."""
    import bitsandbytes

    from qlora.dequant import dequantized, weight_and_rows

    if bf16_base:
        w = dequantized(weight, weight.quant_state, torch.bfloat16)
        y = torch.mm(x2.to(torch.bfloat16), w.t()).to(x2.dtype)
        if bias is not None:
            y.add_(bias)
    elif x2.device.type == "cpu":
        both = weight_and_rows(weight, weight.quant_state, A)
        if both is not None:
            n = both.shape[0] - A.shape[0]
            yh = torch.mm(x2, both.t())
            y = yh[:, :n]
            # x A^T laid out as the route below leaves it, (r x tokens) in memory, for the backward
            return y if bias is None else y.add_(bias), yh[:, n:].t().contiguous().t()
        w = dequantized(weight, weight.quant_state, x2.dtype)
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    else:
        y = bitsandbytes.matmul_4bit(x2, weight, quant_state=weight.quant_state, bias=bias)
    return y, torch.mm(A, x2.t()).t()  # x A^T as (A x^T)^T: MKL's faster layout (above)


def _fused_arguments(layer, x):
    """LoraMatmul4bit's arguments for this layer and input, or None where PEFT's forward must run."""
    if not torch.is_grad_enabled() or not _computes_in(x):
        return None
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    base = layer.get_base_layer()
    weight, bias = base.weight, base.bias
    plain = (isinstance(layer.lora_dropout[name], torch.nn.Identity)
             and lora_A.bias is None and lora_B.bias is None
             and lora_A.weight.dtype == lora_B.weight.dtype == torch.float32
             and getattr(weight, "quant_state", None) is not None
             and getattr(base, "compute_dtype", None) in (None, x.dtype)
             and (bias is None or (bias.dtype == x.dtype and not bias.requires_grad)))
    bf16_base = _bf16_base and x.device.type == "cpu"  # fp32 there (_computes_in)
    return (x, lora_A.weight, lora_B.weight, layer.scaling[name], weight, bias, bf16_base) if plain else None


def _computes_in(x) -> bool:
    """Whether x's dtype is the one PEFT's forward would compute this layer in: fp32 on CPU (16-bit
    matmuls there are slower, and PEFT's path stays); on GPUs the compute dtype, also autocast's."""
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    if torch.compiler.is_compiling():  # bitsandbytes' product traced on GPUs: not tried, PEFT's path
        return False
    autocast = torch.is_autocast_enabled(x.device.type)
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32) and (
        not autocast or torch.get_autocast_dtype(x.device.type) == x.dtype)


def _forward(original, layer, x, *args, **kwargs):
    fused = None if args or kwargs else _fused_arguments(layer, x)
    return original(layer, x, *args, **kwargs) if fused is None else LoraMatmul4bit.apply(*fused)


_bf16_base = False  # within fused_lora(bf16_base=True)


@contextmanager
def fused_lora(enabled: bool = True, bf16_base: bool = False):
    """Within the block, PEFT's 4-bit LoRA layers train through LoraMatmul4bit where they can;
    bf16_base: their base products on CPU in bf16 (train.bf16_base_products)."""
    from qlora.speed import _swapped, _optional_module

    bnb_lora = _optional_module("peft.tuners.lora.bnb") if enabled else None  # absent: PEFT without bitsandbytes
    layer = getattr(bnb_lora, "Linear4bit", None)
    original = getattr(layer, "forward", None)
    with _swapped(layer, forward=lambda self, x, *args, **kwargs: _forward(original, self, x, *args, **kwargs)), \
            _swapped(sys.modules[__name__], _bf16_base=enabled and bf16_base):
        yield


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16), as bitsandbytes checks it."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())
