"""Speed levers that are ours rather than a flag of the libraries, each tested to leave the losses
unchanged (tests/integration/test_speed.py).

- Score only trained positions on CPU. TRL's chunked LM head computes the (tokens x vocab) logits
  of only the positions whose next token is trained when it runs its Triton kernels (GPUs), and
  of every position elsewhere, to keep tile shapes fixed for compilers that recompile on new
  shapes. Eager CPU execution has no such compiler, so scoring only trained positions is the
  same loss for less work and memory: with chat data, where the prompt is not trained, most
  positions are skipped.
- Small LM-head tiles on CPU. TRL's head works through (4096 tokens x 32768 vocabulary) tiles; on
  CPU its backward holds about ten fp32 temporaries of a tile, 0.27 GB each at 2048 tokens.
  1024 x 8192 tiles keep them at 34 MB for the same loss (the tiles are summed exactly as before,
  up to float rounding) and the same speed.
"""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def trained_positions_only_on_cpu(enabled: bool = True):
    """Within the block, TRL's fused LM head scores only trained positions on CPU too."""
    if not enabled:
        yield
        return
    try:
        import trl.trainer.utils as tu
    except ImportError:
        yield
        return
    original = getattr(tu, "_use_triton", None)
    if original is None:  # another TRL layout: leave it as it is
        yield
        return
    tu._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        tu._use_triton = original


CPU_HEAD_TILE = (1024, 8192)  # tokens x vocabulary columns per tile of TRL's chunked LM head on CPU


@contextmanager
def small_head_tiles(enabled: bool = True):
    """Within the block, TRL's chunked LM head works through CPU_HEAD_TILE tiles (use on CPU runs only:
    the sizes are module settings, and a GPU's kernels are tuned to TRL's own)."""
    try:
        import trl.kernels.chunked_logprob as ck
        import trl.trainer.utils as tu
    except ImportError:
        enabled = False
    if not enabled or not hasattr(ck, "TOKEN_CHUNK_SIZE") or not hasattr(tu, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        yield  # another TRL layout: leave it as it is
        return
    original = ck.TOKEN_CHUNK_SIZE, tu._CHUNKED_LOGPROB_CHUNK_SIZE
    ck.TOKEN_CHUNK_SIZE, tu._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_HEAD_TILE
    try:
        yield
    finally:
        ck.TOKEN_CHUNK_SIZE, tu._CHUNKED_LOGPROB_CHUNK_SIZE = original
