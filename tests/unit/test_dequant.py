"""train.fast_dequant: our C kernel gives bitsandbytes' fp32 weights bit for bit, takes over
bitsandbytes' dequantization only within its block and only where it applies, and where it cannot
be built, training is told why and bitsandbytes' code runs.

bitsandbytes 0.50's AVX-512 kernel dequantizes wrongly where a row of the weight does not hold whole
blocks (576 columns in blocks of 128; measured on an AMD EPYC with AVX-512, not on CPUs without it):
there the kernel is held to the definition, code[nibble] x absmax, and the other weights here have
rows of whole blocks, as models' layers do."""
import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora import dequant
from qlora.dequant import dequantize_4bit, dequantized, fast_dequant, kernel


def by_definition(packed, state):
    """The weight as the format defines it: each 4-bit code's value times its block's absmax (itself
    dequantized from 8 bits plus the offset under double quantization)."""
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1).long()
    values = state.code[nibbles][:state.shape.numel()]
    blocks = absmax.repeat_interleave(state.blocksize)[:values.numel()]
    return (values * blocks).view(state.shape)


def quantized(shape, quant_type="nf4", nested=True, blocksize=64, seed=0):
    torch.manual_seed(seed)
    return bnbf.quantize_4bit(torch.randn(*shape) * 0.02, quant_type=quant_type, compress_statistics=nested,
                              blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(192, 576), (7, 40), (3, 10)])  # whole blocks; a short last block
def test_kernel_gives_bitsandbytes_weights_bit_for_bit(quant_type, nested, blocksize, shape):
    assert kernel()[0] is not None, kernel()[1]
    packed, state = quantized(shape, quant_type, nested, blocksize)
    ours = dequantize_4bit(packed, state)
    assert ours is not None and ours.shape == shape
    assert torch.equal(ours, by_definition(packed, state))
    if shape[1] % blocksize == 0:  # bitsandbytes' kernels are right on every CPU there (module docstring)
        assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(192, 576), (7, 40), (3, 10)])  # the vector loop; short blocks
def test_bf16_weights_are_the_fp32_ones_rounded_as_torch_rounds(monkeypatch, shape, ties):
    assert kernel()[0] is not None, kernel()[1]
    calls, run = [], dequant._run
    monkeypatch.setattr(dequant, "_run", lambda *a: calls.append(a) or run(*a))
    packed, state = quantized(shape, nested=not ties)
    if ties:  # code values half-way between two bf16 numbers, below even and odd ones, at scale 1
        halves = torch.tensor([((0x3F00 + i) << 16) | 0x8000 for i in range(16)], dtype=torch.int32)
        state.code, state.absmax = halves.view(torch.float32), torch.ones_like(state.absmax)
    fp32 = dequantize_4bit(packed, state)
    with fast_dequant():
        bf16 = dequantized(packed, state, torch.bfloat16)
    assert calls[-1][-1] is True  # bf16 straight from the kernel
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, fp32.to(torch.bfloat16))
    assert torch.equal(dequantized(packed, state, torch.bfloat16), bnbf.dequantize_4bit(packed, state).bfloat16())


def test_the_checks_run_once_per_weight_and_again_for_new_scales_or_data(monkeypatch):
    checks, handled = [], dequant._handled
    monkeypatch.setattr(dequant, "_handled", lambda *a: checks.append(1) or handled(*a))
    packed, state = quantized((64, 128), nested=False)
    first = dequantize_4bit(packed, state)
    assert torch.equal(dequantize_4bit(packed, state), first) and len(checks) == 1
    state.absmax = state.absmax * 2  # new scales: the weights follow
    assert torch.equal(dequantize_4bit(packed, state), 2 * first) and len(checks) == 2
    other, _ = quantized((64, 128), nested=False, seed=1)  # new packed data under the same scales
    assert torch.equal(dequantize_4bit(other, state), bnbf.dequantize_4bit(other, state)) and len(checks) == 3
    row = other.t()  # the same data as one row, as bitsandbytes' matmul passes it: its own layout
    assert torch.equal(dequantize_4bit(row, state), bnbf.dequantize_4bit(row, state)) and len(checks) == 4
    assert dequantize_4bit(other, state).shape == (64, 128) and len(checks) == 4


def test_within_the_block_bitsandbytes_dequantizes_through_the_kernel_where_it_applies(monkeypatch):
    calls, run = [], dequant._run
    monkeypatch.setattr(dequant, "_run", lambda *a: calls.append(1) or run(*a))
    packed, state = quantized((64, 128))
    expected = bnbf.dequantize_4bit(packed, state)
    with fast_dequant() as on:
        assert on
        assert torch.equal(bnbf.dequantize_4bit(packed, state), expected) and len(calls) == 1
        half = bnbf.quantize_4bit(torch.randn(64, 128).half(), quant_type="nf4")  # a 16-bit compute dtype
        assert bnbf.dequantize_4bit(*half).dtype == torch.float16 and len(calls) == 1
    bnbf.dequantize_4bit(packed, state)
    assert len(calls) == 1  # outside the block: bitsandbytes' code again
    with fast_dequant(False) as on:
        bnbf.dequantize_4bit(packed, state)
        assert not on and len(calls) == 1


def test_without_a_compiler_bitsandbytes_dequantizes_and_training_is_told_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(dequant, "_lib", None)
    monkeypatch.setattr(dequant, "_told", False)
    kernel.cache_clear()
    try:
        lib, reason = kernel()
        assert lib is None and "no-such-cc" in reason
        packed, state = quantized((64, 128))
        assert dequantize_4bit(packed, state) is None
        with fast_dequant() as on:
            assert not on and bnbf.dequantize_4bit(packed, state).shape == (64, 128)
        assert "the dequantization kernel could not be built" in capsys.readouterr().err
        assert not list(tmp_path.glob("kernels/*.so"))
    finally:
        kernel.cache_clear()
        monkeypatch.undo()
        kernel()


@pytest.mark.slow
def test_compiled_graphs_keep_the_kernel_as_one_op():
    packed, state = quantized((192, 576))
    x = torch.randn(5, 576)

    def layer(x):
        return x @ bnbf.dequantize_4bit(packed, state).t()

    def bf16_layer(x):  # as train.bf16_base_products multiplies
        return x.bfloat16() @ dequantized(packed, state, torch.bfloat16).t()

    expected, expected_bf16 = layer(x), bf16_layer(x)
    with fast_dequant():
        for f, out in ((layer, expected), (bf16_layer, expected_bf16)):
            compiled = torch.compile(f, fullgraph=True)  # fullgraph: a graph break would fail here
            assert torch.equal(compiled(x), out)
