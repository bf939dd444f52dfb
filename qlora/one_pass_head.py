"""The LM head's loss and its input gradient in one pass over the vocabulary, for CPU training
(train.head_one_pass).

TRL's chunked head (trl.kernels.chunked_logprob) computes each token's log-probability of its
target, log p_t = z_t[target] - logsumexp(z_t) with z_t = W h_t, tile by tile over the vocabulary,
and in the backward computes every tile of logits again to form the gradient: three products with
the head's weight per tile (logits, logits again, input gradient). With a frozen head (tied
embeddings, as LoRA leaves them) the gradient of log p_t with respect to h_t does not depend on
anything the backward brings but one number per token:

    d log p_t / d h_t = W[target] - sum_v p_tv W_v,    d loss / d h_t = g_t (W[target] - sum_v p_tv W_v)

so the forward can accumulate sum_v exp(z_tv - m_t) W_v tile by tile, beside the running maximum
m_t and sum of exponentials (rescaling what it holds when the maximum grows, as the sum is
rescaled), and the backward only multiplies by g_t: two products per tile instead of three, and
no tile work in the backward. The loss, entropy and top-1 outputs are those of the in-place
tiles (qlora.speed, train.head_tiles_in_place, which this lever needs on); the gradient agrees
with TRL's to float rounding.

On CPUs with bf16 units, under train.bf16_base_products (as the 4-bit layers' products in
qlora/fused_lora.py), the two products with the frozen head run in bf16, each tile of the weight
cast as it is used; the statistics, the sums over tiles and W[target] stay fp32. The logits are
then rounded to bf16 (torch has no bf16 product with an fp32 output on CPU). On SmolLM2's head
(49152 x 576) and 330 tokens of its own hidden states: 1.79x the fp32 products, the loss 0.0017
higher, the input gradient within 1.3%; 1.09-1.17x a training step (bench/README.md).

Anything else goes to TRL's own forward and backward: a trained head or bias, 16-bit tensors,
temperature, soft-capping or scaled logits, outputs other than entropy and top-1, no gradient
wanted, a GPU; and a gradient for the entropy, should a loss use it.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch


class OnePassLogProb(torch.autograd.Function):
    """TRL's ChunkedLogProbFunction, with the input gradient formed in the forward where it can be."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=None):
        import trl.kernels.chunked_logprob as ck

        outputs = ck.OPTIONAL_OUTPUTS if outputs is None else outputs
        ctx.gradient = None
        one_pass = (ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3]) and bias is None
                    and hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32
                    and temperature == 1 and final_logit_softcapping is None and logit_scale == 1
                    and not torch.is_autocast_enabled("cpu") and set(outputs) <= {"log_probs", "entropy", "is_top1"})
        if not one_pass:
            return ck.ChunkedLogProbFunction.forward(ctx, hidden, weight, bias, targets, temperature, chunk_size,
                                                     final_logit_softcapping, logit_scale, outputs)
        from qlora.speed import _fold_tile

        ctx.set_materialize_grads(False)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        running_max = torch.full((n_tokens,), float("-inf"))
        max_before_target = torch.full((n_tokens,), float("-inf"))
        sum_exp, x_sum_exp, target_logit = (torch.zeros(n_tokens) for _ in range(3))
        expected_w = torch.zeros_like(hidden)  # sum_v exp(z_v - running max) W_v, per token
        buffer = torch.empty((min(n_tokens, ck.TOKEN_CHUNK_SIZE), chunk_size))
        bf16 = _bf16_products
        for first in range(0, n_tokens, ck.TOKEN_CHUNK_SIZE):
            rows = slice(first, min(first + ck.TOKEN_CHUNK_SIZE, n_tokens))
            h = hidden[rows].to(torch.bfloat16) if bf16 else hidden[rows]
            for start in range(0, vocab, chunk_size):
                w = weight[start:start + chunk_size]
                tile = buffer[:h.shape[0], :w.shape[0]]
                if bf16:
                    w = w.to(torch.bfloat16)
                    tile.copy_(torch.mm(h, w.t()))
                else:
                    torch.mm(h, w.t(), out=tile)
                e, rescale = _fold_tile(tile, targets[rows], running_max[rows], sum_exp[rows], x_sum_exp[rows],
                                        max_before_target[rows], target_logit[rows], start, w.shape[0],
                                        "entropy" in outputs, "is_top1" in outputs)
                scaled = expected_w[rows].mul_(rescale.unsqueeze(-1))
                if bf16:
                    scaled.add_(torch.mm(e.to(torch.bfloat16), w))
                else:
                    scaled.addmm_(e, w)
        log_z = running_max + torch.log(sum_exp)
        entropy = log_z - x_sum_exp / sum_exp if "entropy" in outputs else None
        is_top1 = (target_logit >= running_max) & (target_logit > max_before_target) if "is_top1" in outputs else None
        # d log p / d h = W[target] - E_p[W]; kept on ctx (neither an input nor an output)
        ctx.gradient = torch.index_select(weight, 0, targets).sub_(expected_w.div_(sum_exp.unsqueeze(-1)))
        # what TRL's backward needs, should a gradient for the entropy arrive
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.compute_dtype, ctx.chunk_size = hidden.dtype, chunk_size
        ctx.kernel_args = {"logit_scale": 1.0, "softcap": 1.0, "inv_t": 1.0, "HAS_SOFTCAP": False}
        if is_top1 is not None:
            ctx.mark_non_differentiable(is_top1)
        return target_logit - log_z, entropy, None, None, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *rest):
        import trl.kernels.chunked_logprob as ck

        if ctx.gradient is None or grad_entropy is not None:
            return ck.ChunkedLogProbFunction.backward(ctx, grad_logprobs, grad_entropy, *rest)
        grad_hidden = None if grad_logprobs is None else ctx.gradient * grad_logprobs.unsqueeze(-1)
        return (grad_hidden,) + (None,) * 8


_bf16_products = False  # within head_one_pass(bf16_products=True)


@contextmanager
def head_one_pass(enabled: bool = True, bf16_products: bool = False):
    """Within the block, TRL's chunked LM head runs through OnePassLogProb (which passes to TRL's own
    function whatever it does not handle); bf16_products: its products with the head in bf16
    (train.bf16_base_products)."""
    from qlora.speed import _optional_module, _swapped

    tu = _optional_module("trl.trainer.utils") if enabled else None
    with _swapped(tu, _ChunkedLogProbFunction=OnePassLogProb), \
            _swapped(sys.modules[__name__], _bf16_products=enabled and bf16_products):
        yield
