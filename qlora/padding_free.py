"""Padding-free micro-batches (data.padding_free): a micro-batch's examples laid end to end in one
row, positions restarting at each, so that no token is padding.

A padded micro-batch makes every row as long as its longest example, and the padding goes through
every layer before the loss drops it. In one row nothing is padding, and attention must stay within
each example. Flash-attention reads the restarts from the positions (its variable-length kernel).
For SDPA, transformers would build a block-diagonal mask over the whole row, attention then costing
(examples x length)^2 rather than examples x length^2 (0.90x of the padded batch's speed on the
demo's decoder pass); so for the time of training the model attends through "qlora_segments", which
runs SDPA over each example's span with its causal flag (1.03x faster than the padded batch there,
where padding is 3% of the tokens; more where lengths vary). Anything else reaching it, such as
a padded batch, a cached step, or sliding-window attention longer than an example, goes to
transformers' SDPA with the mask it builds for SDPA.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import List, Optional, Tuple

import torch

NAME = "qlora_segments"  # the attention implementation registered with transformers
COMPILED_MIN_PADDING = 0.10  # train.compile and data.padding_free=auto: the padding share worth a split graph
_last: Tuple[Optional[torch.Tensor], Optional[List[Tuple[int, int]]]] = (None, None)  # (position_ids, spans)


def padding_free_wanted(setting, device: str, packing: bool, attn: str, compiling: bool, padding: float) -> bool:
    """data.padding_free resolved for this run (attn: the model's attention implementation; padding:
    padding_share of its micro-batches). auto = on CPU with SDPA, unless data.packing has filled the
    rows already (bench/packing.py: packed rows 1.40x the padded batches' speed, the same rows end to
    end 1.28x, their many short examples each a small SDPA call), and under train.compile only where
    padding is at least COMPILED_MIN_PADDING of the tokens (its attention splits the compiled graphs:
    0.96x with 3% padding). true is correct with any attention: flash-attention reads the restarts,
    and eager attention gets transformers' mask."""
    from qlora.config import Switch

    if setting is not Switch.auto:
        return setting is Switch.true
    return device == "cpu" and attn == "sdpa" and not packing and (not compiling or padding >= COMPILED_MIN_PADDING)


def padding_share(lengths: List[int], batch: int, draws: int = 256) -> float:
    """The share of padding in micro-batches of `batch` examples drawn at random from these lengths."""
    rng = random.Random(0)
    batches = [lengths] if len(lengths) <= batch else [rng.sample(lengths, batch) for _ in range(draws)]
    padded = sum(len(b) * max(b, default=0) for b in batches)
    return 1 - sum(map(sum, batches)) / padded if padded else 0.0


def spans(position_ids: torch.Tensor) -> Optional[List[Tuple[int, int]]]:
    """(start, end) of each example in one row whose positions restart at 0; None for a single example
    (or a row that does not start at position 0, such as a cached generation step)."""
    global _last
    if _last[0] is position_ids:  # every layer of one forward pass gets the same tensor
        return _last[1]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    found = None
    if len(starts) > 1 and starts[0] == 0:
        ends = starts[1:] + [position_ids.shape[-1]]
        found = list(zip(starts, ends))
    _last = (position_ids, found)
    return found


@torch.compiler.disable
def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface: SDPA over each example of a one-row micro-batch; output
    (batch, length, heads, head_dim) as transformers' SDPA gives it. train.compile's graphs stop
    around it (traced, its Python spans made the compiled layers recompile at every step: 12.8
    against 122.5 tokens/s on SmolLM2)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    found = None
    if (query.shape[0] == 1 and position_ids is not None and query.shape[2] == key.shape[2] == position_ids.shape[-1]
            and getattr(module, "is_causal", True) and kwargs.get("softcap") is None):
        found = spans(position_ids)
        window = kwargs.get("sliding_window")
        if found and window and max(b - a for a, b in found) > window:
            found = None
    if not found:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = key.shape[1] != query.shape[1]
    # split, not sliced: the spans cover the row, and split's backward is one cat of the gradients, where
    # each slice's makes a zeroed tensor of the whole row (a decoder pass of SmolLM2 1.01-1.03x, the same numbers)
    sizes = [b - a for a, b in found]
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))], dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Makes NAME an attention implementation of transformers, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextmanager
def segment_attention_for(model, enabled: bool = True):
    """Within the block, a model that attends through SDPA attends through segment_attention."""
    config = getattr(model, "config", None)
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
