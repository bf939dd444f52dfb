"""train.head_one_pass: the LM head's input gradient formed in the forward equals TRL's two-pass one."""
import pytest
import torch
import trl.kernels.chunked_logprob as ck
import trl.trainer.utils as tu

from qlora.one_pass_head import OnePassLogProb, head_one_pass

OUTPUTS = ("log_probs", "entropy", "is_top1")


@pytest.fixture
def head(monkeypatch):
    """A head over 1000 words on 300 tokens, in chunks of 128 tokens and tiles of 256 columns (the
    last one partial); some targets are their row's top word, so top-1 hits are counted too."""
    monkeypatch.setattr(ck, "TOKEN_CHUNK_SIZE", 128)
    g = torch.Generator().manual_seed(0)
    weight, hidden = torch.randn(1000, 64, generator=g) * 0.5, torch.randn(300, 64, generator=g)
    targets = torch.randint(0, 1000, (300,), generator=g)
    targets[::3] = (hidden[::3] @ weight.t()).argmax(-1)
    return hidden, weight, targets, torch.rand(300, generator=g)


def run(function, hidden, weight, targets, grad, *, train_weight=False, entropy_weight=0.0):
    """Outputs and gradients of one pass through `function`, with `grad` as the per-token loss weights."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(train_weight)
    logp, entropy, _, _, top1 = function.apply(h, w, None, targets, 1.0, 256, None, 1.0, OUTPUTS)
    loss = (logp * grad).sum()
    (loss + entropy_weight * entropy.sum() if entropy_weight else loss).backward()
    return logp.detach(), entropy.detach(), top1, h.grad, w.grad


def test_outputs_and_input_gradient_are_trl_s(head):
    ours, theirs = run(OnePassLogProb, *head), run(ck.ChunkedLogProbFunction, *head)
    assert torch.equal(ours[0], theirs[0])
    assert torch.allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert ours[2].tolist() == theirs[2].tolist() and 0 < int(ours[2].sum()) < 300
    assert torch.allclose(ours[3], theirs[3], rtol=1e-5, atol=1e-5)
    assert ours[3].abs().max() > 0.1 and ours[4] is None


@pytest.mark.parametrize("fallback", ["trained head", "entropy in the loss"])
def test_what_one_pass_does_not_cover_gets_trl_s_gradients(head, fallback):
    kw = {"train_weight": True} if fallback == "trained head" else {"entropy_weight": 0.3}
    ours, theirs = run(OnePassLogProb, *head, **kw), run(ck.ChunkedLogProbFunction, *head, **kw)
    assert torch.allclose(ours[3], theirs[3], rtol=1e-5, atol=1e-5)
    if fallback == "trained head":
        assert torch.allclose(ours[4], theirs[4], rtol=1e-5, atol=1e-5) and ours[4].abs().max() > 0.1


def test_without_gradients_the_outputs_are_trl_s(head):
    hidden, weight, targets, _ = head
    with torch.no_grad():
        ours = OnePassLogProb.apply(hidden, weight, None, targets, 1.0, 256, None, 1.0, OUTPUTS)
        theirs = ck.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 256, None, 1.0, OUTPUTS)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_bf16_products_give_the_loss_and_gradient_to_bf16_rounding(head):
    """train.bf16_base_products on the head: its two products in bf16, within the block only; the
    log-probabilities and input gradient to bf16's rounding; what one pass does not cover stays TRL's."""
    import qlora.one_pass_head as one_pass

    fp32 = run(OnePassLogProb, *head)
    with head_one_pass(True, bf16_products=True):
        bf16 = run(OnePassLogProb, *head)
        trained = run(OnePassLogProb, *head, train_weight=True)
    assert not one_pass._bf16_products
    assert not torch.equal(bf16[0], fp32[0]) and not torch.equal(bf16[3], fp32[3])  # made in bf16
    assert (bf16[0] - fp32[0]).abs().max() < 0.1 and abs(bf16[0].mean() - fp32[0].mean()) < 0.01
    assert (bf16[3] - fp32[3]).norm() < 0.02 * fp32[3].norm()
    theirs = run(ck.ChunkedLogProbFunction, *head, train_weight=True)
    assert torch.allclose(trained[3], theirs[3], rtol=1e-5, atol=1e-5)
    assert torch.allclose(trained[4], theirs[4], rtol=1e-5, atol=1e-5)


def test_the_swap_lasts_for_its_block():
    original = tu._ChunkedLogProbFunction
    with head_one_pass(True):
        assert tu._ChunkedLogProbFunction is OnePassLogProb
    with head_one_pass(False):
        assert tu._ChunkedLogProbFunction is original
    assert tu._ChunkedLogProbFunction is original
