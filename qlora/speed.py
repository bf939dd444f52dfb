"""Speed levers that are ours rather than a flag of the libraries, each tested to leave the losses
unchanged (tests/integration/test_speed.py).

- Score only trained positions on CPU. TRL's chunked LM head computes the (tokens x vocab) logits
  of only the positions whose next token is trained when it runs its Triton kernels (GPUs), and
  of every position elsewhere, to keep tile shapes fixed for compilers that recompile on new
  shapes. Eager CPU execution has no such compiler, so scoring only trained positions is the
  same loss for less work and memory: with chat data, where the prompt is not trained, most
  positions are skipped.
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
