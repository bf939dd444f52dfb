"""data.padding_free: when it applies, how a one-row micro-batch is cut into its examples, and how it
attends on a GPU (torch's varlen attention, here through CPU stand-ins)."""
import functools

import pytest
import torch

from qlora.config import Switch
from qlora.padding_free import padding_share, spans
from qlora.validation import padding_free_on


def test_auto_is_on_for_cpu_training_with_sdpa_unless_packed_or_compiled_with_little_padding():
    assert padding_free_on(Switch.auto, "cpu", False, "sdpa", False, 0.0)
    assert not padding_free_on(Switch.auto, "cpu", True, "sdpa", False, 0.5)  # packed rows are full already
    assert not padding_free_on(Switch.auto, "cuda", False, "sdpa", False, 0.5)  # unmeasured on GPUs
    assert not padding_free_on(Switch.auto, "cpu", False, "eager", False, 0.5)  # a dense mask over the row
    assert not padding_free_on(Switch.auto, "cpu", False, "sdpa", True, 0.03)  # splits the compiled graphs
    assert padding_free_on(Switch.auto, "cpu", False, "sdpa", True, 0.3)  # ... which is worth 30% padding
    assert padding_free_on(Switch.true, "cuda", True, "flash_attention_2", True, 0.0)
    assert not padding_free_on(Switch.false, "cpu", False, "sdpa", False, 0.5)


def test_padding_share_is_the_padding_of_random_micro_batches():
    assert padding_share([10] * 20, 4) == padding_share([], 4) == 0.0
    assert padding_share([10, 30], 4) == pytest.approx(1 / 3)  # fewer rows than a batch: one batch of all
    assert 0.15 < padding_share([10, 30] * 50, 2) < 0.25  # half the pairs mixed (20 of 60 padding): 1/5 in all


def test_spans_are_the_examples_of_a_row_whose_positions_restart():
    row = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert spans(row) == [(0, 3), (3, 5), (5, 9)]
    assert spans(row) is spans(row), "worked out once per forward pass, not once per layer"
    assert spans(torch.tensor([[0, 1, 2, 3]])) is None  # one example: plain causal attention
    assert spans(torch.tensor([[7, 8, 0, 1]])) is None  # not the start of a row (a cached step)


def _causal_per_span(query, key, value, cu, scale, gqa):
    """What varlen_attn computes, (tokens, heads, dim) in and out, by SDPA example by example (on CPU)."""
    ends = cu.tolist()
    outs = [torch.nn.functional.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1) for t in (query, key, value)), is_causal=True, scale=scale, enable_gqa=gqa)
        for a, b in zip(ends, ends[1:])]
    return torch.cat(outs, dim=1).transpose(0, 1)


def varlen_now(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False):
    """torch 2.13's signature: causal as window_size=(-1, 0); scale and GQA as arguments."""
    assert window_size == (-1, 0) and cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32
    assert max_q == max_k == int(cu_seq_q.diff().max())
    assert enable_gqa == (key.shape[1] != query.shape[1])
    return _causal_per_span(query, key, value, cu_seq_q, scale, enable_gqa)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's: is_causal; the scale fixed at 1/sqrt(head_dim); as many key heads as query heads."""
    assert is_causal and key.shape[1] == query.shape[1]
    return _causal_per_span(query, key, value, cu_seq_q, None, False)


@pytest.fixture
def varlen(monkeypatch):
    """Sets torch.nn.attention.varlen.varlen_attn to a CPU stand-in for the time of a test."""
    import torch.nn.attention.varlen as module

    from qlora import padding_free

    def use(fake):
        monkeypatch.setattr(module, "varlen_attn", fake)
        padding_free._varlen_parameters.cache_clear()
        padding_free.varlen_problem.cache_clear()
    yield use
    padding_free._varlen_parameters.cache_clear()
    padding_free.varlen_problem.cache_clear()


@pytest.mark.parametrize("fake", [varlen_now, varlen_2_10], ids=["torch-2.13", "torch-2.10"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_varlen_attention_is_the_example_by_example_loop_whatever_varlen_attn_takes(varlen, fake, kv_heads):
    """On a GPU a one-row micro-batch attends through torch's varlen_attn (one kernel for all
    examples), whose arguments changed between torch releases: ours are read from its signature.
    Here stand-ins with each signature, computing what the kernel does, check that we call it with
    the spans, causal flag, scale and key heads that give the loop's numbers."""
    from qlora.padding_free import varlen_attention, varlen_problem

    varlen(fake)
    torch.manual_seed(0)
    found, scale = [(0, 3), (3, 4), (4, 11)], 0.3  # not 1/sqrt(16): torch 2.10 had no scale argument
    q, k, v = (torch.randn(1, h, 11, 16) for h in (4, kv_heads, kv_heads))
    loop = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[:, :, a:b] for t in (q, k, v)), is_causal=True, scale=scale, enable_gqa=kv_heads != 4)
        for a, b in found], dim=2)
    assert torch.allclose(varlen_attention(q, k, v, found, scale), loop[0].transpose(0, 1), atol=1e-6)
    assert varlen_problem("cpu", torch.bfloat16, 4, kv_heads, 16) is None  # the check at first use passes


def test_varlen_attention_is_refused_where_it_fails_or_differs(varlen):
    """The first-use check keeps the loop where varlen_attn raises (a GPU without flash attention),
    gives other numbers, or the dtype is not 16-bit."""
    from qlora.padding_free import varlen_problem

    def refuses(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore")

    varlen(refuses)
    assert varlen_problem("cpu", torch.bfloat16, 4, 2, 16) == (
        "RuntimeError: FlashAttention only supports Ampere GPUs or newer.")
    varlen(functools.wraps(varlen_now)(lambda *a, **kw: varlen_now(*a, **kw).flip(0)))  # tokens out of order
    assert varlen_problem("cpu", torch.bfloat16, 4, 2, 16).startswith("its results differ from SDPA's")
    varlen(varlen_now)
    assert varlen_problem("cpu", torch.float32, 4, 2, 16) == "flash attention computes in fp16 or bf16, not float32"


def test_the_first_use_check_stands_apart_from_the_step_it_is_made_in(varlen):
    """It runs in whatever layer first attends: under an evaluation's no_grad, or within a
    checkpointed layer, whose hooks would take the check's saved tensors for their own."""
    from qlora import padding_free

    varlen(varlen_now)
    with torch.no_grad():
        assert padding_free.varlen_problem("cpu", torch.bfloat16, 4, 2, 16) is None
    padding_free.varlen_problem.cache_clear()

    def layer(x):
        assert padding_free.varlen_problem("cpu", torch.bfloat16, 4, 2, 16) is None
        return x * 2

    x = torch.ones(3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def _tiny(kind: str, **extra):
    """A random 2-layer decoder attending through SDPA, in training mode (as segment_attention_for serves it)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config, model = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    m = model(config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", **extra))
    return m.train()


@pytest.mark.parametrize("kind,extra,masks", [("llama", {}, 0), ("mistral", {"sliding_window": 3}, 1)],
                         ids=["split: no mask", "window shorter than an example: SDPA's mask"])
def test_a_row_split_into_its_examples_gets_no_mask_and_the_same_logits(kind, extra, masks, monkeypatch):
    import transformers.masking_utils as masking

    from qlora.padding_free import segment_attention_for

    built = []
    sdpa_mask = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda **kw: built.append(sdpa_mask(**kw)) or built[-1])
    model = _tiny(kind, **extra)
    examples = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 2, 7)]
    alone = torch.cat([model(input_ids=e, use_cache=False).logits for e in examples], dim=1)
    row = torch.cat(examples, dim=1)
    positions = torch.cat([torch.arange(e.shape[1]) for e in examples])[None]
    built.clear()
    with segment_attention_for(model) as used:
        together = model(input_ids=row, position_ids=positions, use_cache=False).logits
    assert sum(m is not None for m in built) == masks and used == ({"per-example SDPA"} if not masks else set())
    torch.testing.assert_close(together, alone)


def test_the_mask_made_from_a_rows_examples_is_block_diagonal():
    from qlora.padding_free import span_mask

    found, n = [(0, 2), (2, 5)], 5

    def allowed(i, j, causal, window):
        return (any(a <= i < b and a <= j < b for a, b in found) and (not causal or j <= i)
                and (window is None or i - j < window))
    for causal in (True, False):
        for window in (None, 2):
            expect = torch.tensor([[allowed(i, j, causal, window) for j in range(n)] for i in range(n)])
            assert torch.equal(span_mask(found, n, "cpu", causal, window)[0, 0], expect), (causal, window)


def test_a_layer_that_cannot_split_a_row_without_a_mask_attends_within_each_example():
    from types import SimpleNamespace

    from qlora.padding_free import segment_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    bidirectional = SimpleNamespace(is_causal=False, training=True)  # an encoder-style layer: not split
    out, _ = segment_attention(bidirectional, q, k, v, None, position_ids=positions)
    alone = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                       for a, b in [(0, 3), (3, 7)]], dim=2).transpose(1, 2)
    torch.testing.assert_close(out, alone)
