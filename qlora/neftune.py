"""NEFTune (train.neftune_noise_alpha): uniform noise added to the input embeddings while training.

Jain et al. (2023) add to each example's embeddings noise drawn uniformly from [-b, b] with
b = alpha / sqrt(L d), L the example's length and d the hidden size (alpha 5 in most of their runs),
and report better instruction following at the same loss curve's end. transformers' own hook takes L
as the width of the micro-batch's tensor: the longest example plus padding in a padded batch, and the
whole row of examples laid end to end under data.padding_free or data.packing, where b would shrink
with the number of examples in the row. Here L is each example's own length, read from the positions
(which restart at each example in packed and padding-free rows) or else from the attention mask, so
that an example gets the same noise whatever it is batched with. Evaluation and generation (the model
in eval mode) get none.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch


def example_lengths(shape, position_ids: Optional[torch.Tensor] = None,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(rows x tokens): the length of the example each token belongs to. Examples start where the
    positions restart at 0 (packed and padding-free rows); without positions a row is one example,
    its unmasked tokens if there is a 2-D attention mask."""
    rows, width = shape
    if position_ids is not None and tuple(position_ids.shape) == (rows, width):
        starts = position_ids == 0
        starts[:, 0] = True
        segment = starts.long().cumsum(1) + torch.arange(rows, device=starts.device)[:, None] * (width + 1)
        return torch.bincount(segment.flatten(), minlength=rows * (width + 1))[segment]
    if attention_mask is not None and tuple(attention_mask.shape) == (rows, width):
        return attention_mask.long().sum(1, keepdim=True).clamp(min=1).expand(rows, width)
    return torch.full((rows, width), width)


class EmbeddingNoise:
    """The two hooks: one on the decoder that notes the positions and mask of the forward under way,
    one on the input embeddings that adds the noise."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.position_ids: Optional[torch.Tensor] = None
        self.attention_mask: Optional[torch.Tensor] = None

    def note_inputs(self, module, args, kwargs):
        self.position_ids, self.attention_mask = kwargs.get("position_ids"), kwargs.get("attention_mask")

    def add_noise(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        mask = self.attention_mask if isinstance(self.attention_mask, torch.Tensor) else None
        lengths = example_lengths(output.shape[:2], self.position_ids, mask).to(output.device)
        bound = (self.alpha / torch.sqrt(lengths.to(torch.float32) * output.shape[-1])).to(output.dtype)
        return output + torch.empty_like(output).uniform_(-1, 1) * bound[..., None]


@contextmanager
def embedding_noise(model, alpha: float):
    """Within the block, the model's input embeddings get NEFTune's noise while it trains (alpha 0: none)."""
    if not alpha:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    noise = EmbeddingNoise(alpha)
    hooks = [base.get_decoder().register_forward_pre_hook(noise.note_inputs, with_kwargs=True),
             base.get_input_embeddings().register_forward_hook(noise.add_noise)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
