"""train.fused_lora: a PEFT 4-bit LoRA layer trained through LoraMatmul4bit gives PEFT's numbers, and
every case it does not compute goes to PEFT's own forward."""
from functools import partial

import pytest
import torch

from qlora.dequant import fast_dequant
from qlora.fused_lora import fused_lora


class One(torch.nn.Module):
    def __init__(self, n_in, n_out, bias):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


def lora_layer(n_in=128, n_out=160, bias=False, r=8, lora_alpha=16, dropout=0.0, seed=0, dtype=torch.float32):
    """A PEFT LoRA layer over a bitsandbytes NF4 layer (double quant, `dtype` compute), LoRA B not zero;
    rows of whole 64-value blocks, where bitsandbytes' AVX-512 dequantization is right (test_dequant.py)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    dense = One(n_in, n_out, bias)
    q = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=dtype, quant_type="nf4",
                          compress_statistics=True)
    q.weight = bnb.nn.Params4bit(dense.proj.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if bias:
        q.bias = torch.nn.Parameter(dense.proj.bias.data.clone(), requires_grad=False)
    dense.proj = q.to("cpu")
    dense.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: PEFT then wraps the layer for bitsandbytes
    model = get_peft_model(dense, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=["proj"]))
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    return model, layer


def run(model, layer, x, grad, fused, kernel=False, bf16_base=False):
    """Output and gradients (input, LoRA A, LoRA B), and whether LoraMatmul4bit made the output;
    kernel: within fast_dequant (then the base and LoRA A are one product); bf16_base: the base's
    products in bf16."""
    x = x.clone().requires_grad_(True)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    for p in params:
        p.grad = None
    with fused_lora(fused, bf16_base), fast_dequant(kernel):
        y = model(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad for p in params], type(y.grad_fn).__name__.startswith("LoraMatmul4bit")


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lora_alpha", [16, 12])  # scaling 2 (exact) and 1.5
def test_fused_layer_gives_peft_s_output_and_gradients(bias, lora_alpha, kernel, monkeypatch):
    from qlora import dequant

    joint = []  # the base and LoRA A as one product, with our dequantization kernel
    monkeypatch.setattr(dequant, "weight_and_rows", partial(
        lambda f, *a: joint.append(f(*a)) or joint[-1], dequant.weight_and_rows))
    model, layer = lora_layer(bias=bias, lora_alpha=lora_alpha)
    x, grad = torch.randn(3, 7, 128), torch.randn(3, 7, 160)
    theirs, used = run(model, layer, x, grad, fused=False)
    assert not used
    ours, used = run(model, layer, x, grad, fused=True, kernel=kernel)
    assert used and len(joint) == 1 and (joint[0] is not None) == kernel
    for name, a, b in zip(("output", "input grad", "A grad", "B grad"), ours, theirs):
        assert a.shape == b.shape, name
        # the same products, the rank-r ones transposed: float rounding apart, PEFT's numbers
        assert (a - b).abs().max() <= 2e-6 * b.abs().max(), name


def test_bf16_base_products_round_only_the_base_s_products():
    """train.bf16_base_products: the output and input gradient carry bf16 products of the base, LoRA's
    gradients are the fp32 ones bit for bit (formed from fp32 tensors), and the layer still trains."""
    from qlora import fused_lora as fl

    model, layer = lora_layer(lora_alpha=12)
    x, grad = torch.randn(3, 7, 128), torch.randn(3, 7, 160)
    fp32, _ = run(model, layer, x, grad, fused=True)
    bf16, used = run(model, layer, x, grad, fused=True, bf16_base=True)
    assert used and not fl._bf16_base  # only within the block
    for name, a, b in zip(("output", "input grad"), bf16[:2], fp32[:2]):
        assert not torch.equal(a, b), name  # the base's products were made in bf16
        assert (a - b).abs().max() <= 1e-2 * b.abs().max(), name  # to bf16's rounding
    assert torch.equal(bf16[2], fp32[2]) and torch.equal(bf16[3], fp32[3])  # LoRA A and B gradients


def test_a_frozen_input_gives_the_same_lora_gradients():
    """The first layer's input (embeddings) needs no gradient: the backward skips it."""
    model, layer = lora_layer()
    x = torch.randn(2, 5, 128)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    grads = {}
    for fused in (False, True):
        for p in params:
            p.grad = None
        with fused_lora(fused):
            model(x).square().sum().backward()
        grads[fused] = [p.grad for p in params]
    torch.testing.assert_close(grads[True], grads[False])


@pytest.mark.parametrize("case", ["no grad", "dropout", "adapter disabled", "bf16 input", "extra argument"])
def test_what_it_does_not_compute_goes_to_peft(case):
    model, layer = lora_layer(dropout=0.1 if case == "dropout" else 0.0)
    x = torch.randn(2, 4, 128)
    calls = []
    peft_forward = type(layer).forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return peft_forward(self, *args, **kwargs)

    type(layer).forward = counting
    try:
        with fused_lora(True):
            if case == "no grad":
                with torch.no_grad():
                    y = model(x)
            elif case == "adapter disabled":
                with model.disable_adapter():
                    y = model(x.requires_grad_(True))
            elif case == "bf16 input":
                y = layer(x.bfloat16())
            elif case == "extra argument":  # PEFT's mixed-adapter batches (inference only)
                model.eval()
                y = layer(x, adapter_names=["default", "default"])
            else:
                y = model(x)
        assert calls == [1]  # the original forward ran, once
        assert y.grad_fn is None or not type(y.grad_fn).__name__.startswith("LoraMatmul4bit")
    finally:
        type(layer).forward = peft_forward
    assert type(layer).forward is peft_forward


def test_the_swap_ends_with_the_block_even_on_error():
    from peft.tuners.lora.bnb import Linear4bit

    original = Linear4bit.forward
    with pytest.raises(RuntimeError), fused_lora(True):
        assert Linear4bit.forward is not original
        raise RuntimeError("stop")
    assert Linear4bit.forward is original


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_compute_gives_peft_s_numbers_under_autocast(dtype):
    """The GPU path's arithmetic (train.fused_lora=true there), run on CPU: 16-bit input, fp32 LoRA
    weights cast as autocast casts them, gradients for them in fp32; PEFT's numbers to 16-bit rounding."""
    from qlora.fused_lora import LoraMatmul4bit

    model, layer = lora_layer(dtype=dtype)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x, grad = torch.randn(3, 7, 128).to(dtype), torch.randn(3, 7, 160).to(dtype)
    results = {}
    for ours in (False, True):
        xi = x.clone().requires_grad_(True)
        A.grad = B.grad = None
        with torch.autocast("cpu", dtype=dtype):
            y = LoraMatmul4bit.apply(xi, A, B, layer.scaling["default"], layer.get_base_layer().weight, None) \
                if ours else model(xi)
        y.backward(grad)
        results[ours] = [y.detach(), xi.grad, A.grad, B.grad]
    assert [t.dtype for t in results[True]] == [dtype, dtype, torch.float32, torch.float32]
    for name, a, b in zip(("output", "input grad", "A grad", "B grad"), results[True], results[False]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # one rounding of the summed products where PEFT rounds each: apart by a few 16-bit ulps
        assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max(), name


def test_which_inputs_it_computes():
    """fp32 on CPU only; on GPUs the 16-bit compute dtypes and fp32 (not under another dtype's autocast)."""
    from types import SimpleNamespace

    from qlora.fused_lora import _computes_in

    def x(device, dtype):
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    assert _computes_in(x("cpu", torch.float32))
    assert not _computes_in(x("cpu", torch.bfloat16)) and not _computes_in(x("cpu", torch.float16))
    assert all(_computes_in(x("cuda", d)) for d in (torch.bfloat16, torch.float16, torch.float32))
    assert not _computes_in(x("cuda", torch.float64))


def test_the_output_takes_in_place_ops():
    """The output (a slice of the joint product, reshaped) is no view to autograd: a model that adds
    to a layer's output in place trains, with the gradients of the same sum made out of place."""
    model, layer = lora_layer()
    x = torch.randn(2, 5, 128)
    grads = {}
    for in_place in (True, False):
        xi = x.clone().requires_grad_(True)
        with fused_lora(True), fast_dequant(True):
            y = model(xi)
            y = y.add_(1.0) if in_place else y + 1.0
        y.square().sum().backward()
        grads[in_place] = xi.grad
    torch.testing.assert_close(grads[True], grads[False])


@pytest.mark.parametrize("units", [True, False])
def test_bf16_base_products_are_on_under_auto_only_on_cpus_with_bf16_units(units, monkeypatch):
    from qlora import fused_lora as fl
    from qlora.config import Switch, TrainConfig
    from qlora.validation import bf16_base_on

    monkeypatch.setattr(fl, "cpu_has_bf16_units", lambda: units)
    auto, true = TrainConfig(), TrainConfig(bf16_base_products=Switch.true)
    assert bf16_base_on(auto, "cpu", True, True) is units
    assert bf16_base_on(true, "cpu", True, True)  # asked for: on, bf16 units or not
    assert not bf16_base_on(true, "cpu", False, True)  # 16-bit compute multiplies in 16 bits already
    assert not bf16_base_on(true, "cpu", True, False)  # the products are made within train.fused_lora's layers
    assert not bf16_base_on(true, "cuda", True, True)
    assert not bf16_base_on(TrainConfig(bf16_base_products=Switch.false), "cpu", True, True)
