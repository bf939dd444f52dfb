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
transformers' SDPA with the mask it builds for SDPA. For the rows it splits, transformers builds no
mask at all (segment_mask): a row's would be (tokens x tokens) bytes, 1 GiB at 32k tokens.

On a GPU, in fp16 or bf16, the row goes instead through torch's variable-length flash attention
(`torch.nn.attention.varlen`): one kernel per layer for all the examples, where the loop above
launches one per example (some 80 per layer on the GPU bench's varied lengths: ~16k tokens a
micro-batch, median length ~200). Its arguments changed between torch releases (2.10 took
`is_causal`; later ones `window_size`, `scale` and `enable_gqa`), so they are read from its
signature, and a tiny forward and backward checked against the loop at first use decides whether
it runs on this GPU, dtype and head shape (it needs flash attention: not on a T4). Unmeasured on a
GPU so far: tests/gpu holds it to the loop's numbers.
"""
from __future__ import annotations

import importlib.util
import inspect
import random
from contextlib import contextmanager
from functools import lru_cache
from typing import List, Optional, Tuple

import torch

NAME = "qlora_segments"  # the attention implementation registered with transformers
_last: Tuple[Optional[torch.Tensor], Optional[List[Tuple[int, int]]]] = (None, None)  # (position_ids, spans)
_cu: Tuple[Optional[list], Optional[torch.Tensor]] = (None, None)  # (spans, their varlen cu_seq tensor)
_told: set = set()  # what varlen_ready has said: None (it runs) or why it cannot
_used: set = set()  # the attentions one-row micro-batches went through, within segment_attention_for
_row: Optional[torch.Tensor] = None  # the position_ids of the decoder's forward under way (segment_attention_for)


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
    """transformers' attention interface: SDPA over each example of a one-row micro-batch (on a GPU
    varlen_attention over all of them, where it runs); output (batch, length, heads, head_dim) as
    transformers' SDPA gives it. train.compile's graphs stop around it (traced, its Python spans made
    the compiled layers recompile at every step: 12.8 against 122.5 tokens/s on SmolLM2)."""
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
        row = spans(position_ids) if attention_mask is None and position_ids is not None else None
        if row:  # segment_mask left the mask out, and this layer cannot split the row: one from its examples
            attention_mask = span_mask(row, key.shape[2], query.device, getattr(module, "is_causal", True),
                                       kwargs.get("sliding_window"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.device.type == "cuda" and not dropout and varlen_ready(query, key):
        _used.add("varlen")
        return varlen_attention(query, key, value, found, scaling).unsqueeze(0), None
    _used.add("per-example SDPA")
    return per_example_attention(query, key, value, found, scaling, dropout).transpose(1, 2).contiguous(), None


def segment_mask(**kwargs) -> Optional[torch.Tensor]:
    """transformers' mask function for "qlora_segments": None, no mask at all, for a forward's one-row
    micro-batch that segment_attention splits into its examples (which reads no mask); otherwise SDPA's
    mask. For one row of n tokens that mask is n x n bytes, 256 MiB at 16k tokens, built at every forward
    and kept through the step."""
    from transformers.masking_utils import sdpa_mask

    length = kwargs["kv_length"]
    found = spans(_row) if _row is not None and _row.shape == (1, length) else None
    padding = kwargs.get("attention_mask")
    window = kwargs.get("local_size")  # sliding-window or chunked layers
    if (found and kwargs["batch_size"] == 1 and kwargs["q_length"] == length
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset") and not kwargs.get("use_vmap")
            and (padding is None or bool(padding.all()))
            and (window is None or max(b - a for a, b in found) <= window)
            and getattr(kwargs.get("config"), "attn_logit_softcapping", None) is None):
        return None
    return sdpa_mask(**kwargs)


def span_mask(found: List[Tuple[int, int]], length: int, device, causal: bool = True,
              window: Optional[int] = None) -> torch.Tensor:
    """SDPA's bool mask (1, 1, length, length) for one row whose examples are found: each token sees its
    own example only (and the tokens before it, causal; within the window)."""
    example = torch.repeat_interleave(torch.arange(len(found)), torch.tensor([b - a for a, b in found]))
    i = torch.arange(length)
    mask = example[:, None] == example[None, :]
    if causal:
        mask &= i[None, :] <= i[:, None]
    if window:
        mask &= i[:, None] - i[None, :] < window
    return mask[None, None].to(device)


def per_example_attention(query, key, value, found: List[Tuple[int, int]], scaling=None, dropout: float = 0.0):
    """Causal SDPA within each (start, end) of found for one row, (1, heads, length, head_dim) in and out."""
    # split, not sliced: the spans cover the row, and split's backward is one cat of the gradients, where
    # each slice's makes a zeroed tensor of the whole row (a decoder pass of SmolLM2 1.01-1.03x, the same numbers)
    sizes = [b - a for a, b in found]
    gqa = key.shape[1] != query.shape[1]
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))], dim=2)


def varlen_attention(query, key, value, found: List[Tuple[int, int]], scaling=None) -> torch.Tensor:
    """Causal attention within each (start, end) of found for one row, query/key/value as transformers
    gives them, (1, heads, length, head_dim), through torch's varlen_attn with the arguments its
    version takes; output (length, heads, head_dim)."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    takes = _varlen_parameters()
    kwargs = {"window_size": (-1, 0)} if "window_size" in takes else {"is_causal": True}
    if "scale" in takes:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling * q.shape[-1] ** 0.5 - 1) > 1e-6:  # its fixed scale, 1/sqrt(dim)
        q = q * (scaling * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in takes:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    cu = _cumulative(found, q.device)
    longest = max(b - a for a, b in found)
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


@lru_cache(maxsize=1)
def _varlen_parameters() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _cumulative(found: List[Tuple[int, int]], device) -> torch.Tensor:
    """The spans' ends from 0 (varlen_attn's cu_seq), int32 on the device: made once per forward pass."""
    global _cu
    if _cu[0] is not found or _cu[1].device != device:
        _cu = (found, torch.tensor([0] + [b for _, b in found], dtype=torch.int32, device=device))
    return _cu[1]


def varlen_ready(query, key) -> bool:
    """Whether varlen_attention runs for attention of this device, dtype and head shape: checked once
    against the example-by-example loop; the run says which of the two attends, once."""
    problem = varlen_problem(str(query.device), query.dtype, query.shape[1], key.shape[1], query.shape[-1])
    if problem not in _told:
        from qlora.models import say

        say("data.padding_free: attention through torch's variable-length flash attention, one call a layer"
            if problem is None else f"data.padding_free: torch's variable-length flash attention cannot run "
            f"here ({problem}); each example goes through SDPA in turn")
        _told.add(problem)
    return problem is None


@lru_cache(maxsize=None)
def varlen_problem(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> Optional[str]:
    """Why varlen_attention cannot stand in for the loop here, or None: it must exist, and run a forward
    and backward over two examples to the loop's output and gradients. Checked apart from the training
    step it is first called in (its autocast, no_grad of an evaluation, checkpointing's hooks)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash attention computes in fp16 or bf16, not {str(dtype).replace('torch.', '')}"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:  # torch 2.10 and later
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    found, scale = [(0, 5), (5, 12)], 0.7 / head_dim ** 0.5
    g = torch.Generator(device=device).manual_seed(0)
    shapes = ((1, heads, 12, head_dim), (1, kv_heads, 12, head_dim), (1, kv_heads, 12, head_dim))
    with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        inputs = [torch.randn(s, device=device, dtype=dtype, generator=g).requires_grad_() for s in shapes]
        try:
            ours = varlen_attention(*inputs, found, scale)
            ours_grads = torch.autograd.grad(ours.float().square().sum(), inputs)
        except Exception as e:  # the kernel refuses this GPU, dtype or head size: the loop runs instead
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
        loop = per_example_attention(*inputs, found, scale)[0].transpose(0, 1)
        loop_grads = torch.autograd.grad(loop.float().square().sum(), inputs)
    worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1)).item()
                for a, b in zip((ours, *ours_grads), (loop, *loop_grads)))
    return None if worst < 0.05 else f"its results differ from SDPA's by up to {worst:.1%}"


def register() -> None:
    """Makes NAME an attention implementation of transformers, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, segment_mask)


@contextmanager
def segment_attention_for(model, enabled: bool = True):
    """Within the block, a model that attends through SDPA attends through segment_attention. Yields
    the set it fills with the attentions one-row micro-batches went through ("varlen", "per-example
    SDPA"), for the report."""
    global _used
    config = getattr(model, "config", None)
    _used = set()
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        yield _used
        return
    register()
    config._attn_implementation = NAME
    decoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(decoder, "base_model", decoder)  # the module that builds the masks (LlamaModel, ...)

    def record(module, args, kwargs):
        global _row
        _row = kwargs.get("position_ids")

    hook = decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield _used
    finally:
        global _row
        hook.remove()
        _row = None
        config._attn_implementation = "sdpa"
