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
- LM-head tiles worked in place on CPU (train.head_tiles_in_place). TRL's torch fallback for its
  head kernels makes a dozen tile-sized temporaries per tile (scaling by factors that are 1, masks,
  copies); ours makes one or two and gives the same numbers: the max, exp and sums in the forward
  (top-1 accuracy from each tile's maximum), exp and a scaled subtraction in the backward.
- The LM head's input gradient formed in its forward pass on CPU (train.head_one_pass; the function
  is in qlora/one_pass_head.py): two products with the head's weight per tile instead of three, and
  no tile work in the backward; the same loss, the gradient to float rounding.
- One autograd function for each 4-bit layer and its LoRA (train.fused_lora, on CPU under auto; the
  function is in qlora/fused_lora.py): PEFT's separate nodes, its copy of the base output and the
  temporaries of their backward go; the same products (the rank-r ones in MKL's faster layout)
  give the same numbers to float rounding. On GPUs (true) in the 16-bit compute dtype. On CPUs
  with bf16 units the base's two products in those layers, and the one-pass head's two, run in
  bf16, all else in fp32 (train.bf16_base_products): the same training to bf16's rounding of those
  products.
- Our own dequantization of 4-bit weights on CPU (train.fast_dequant; qlora/dequant.py): a small C
  kernel compiled at first use, bit for bit bitsandbytes' weights.
- Padding-free micro-batches on CPU (data.padding_free; qlora/padding_free.py): a micro-batch's
  examples end to end in one row, attended example by example, so that no padding is computed.
- torch.compile of the decoder layers at a lower price (train.compile): one graph for all layers but
  the first, LoRA's scaling a constant and AOTAutograd's cache allowed for our LoRA function, so
  that the first step compiles in 7 s with a filled cache, not 34 (compiled_layers says why).
- Checkpoint the first n layers only (train.checkpoint_layers): transformers offers every n-th
  layer (`every_n_layers`), which leaves nothing between all layers and half of them.
- Keep attention outputs under checkpointing (train.checkpoint_attention). TRL offers this
  selective checkpointing through `gradient_checkpointing_kwargs={"selective": True}`, but it wraps
  the PEFT model's `gradient_checkpointing_enable`, while transformers 5's Trainer enables
  checkpointing through `activation_checkpointing_enable` of the model inside: the key then reaches
  the decoder layers' forward as an unused argument and nothing is kept. We set torch's
  selective-checkpoint context on each checkpointed layer once the Trainer has enabled checkpointing.
- Liger's kernels on GPUs (train.liger_kernels): transformers' Trainer applies them when training
  starts (TRL leaves out Liger's fused loss, as it has its own); we check beforehand what would make
  them fail or do nothing: a CPU, the package missing, a model type Liger has no kernels for.
"""
from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

CPU_HEAD_TILE = (1024, 8192)  # tokens x vocabulary columns per tile of TRL's chunked LM head on CPU
COMPILE_MIN_STEPS = 200  # train.compile=auto: shorter CPU runs would spend more compiling than they save


def _optional_module(name: str):
    """The module, or None where this version of the library lays its code out otherwise."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@contextmanager
def _swapped(module, **values):
    """Within the block, the module's (or class's) attributes hold these values; one without them
    (another library layout, or none) is left as it is."""
    if module is None or not all(hasattr(module, k) for k in values):
        yield
        return
    original = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in original.items():
            setattr(module, k, v)


@contextmanager
def trained_positions_only_on_cpu(enabled: bool = True):
    """Within the block, TRL's fused LM head scores only trained positions on CPU too."""
    tu = _optional_module("trl.trainer.utils") if enabled else None
    original = getattr(tu, "_use_triton", None)
    with _swapped(tu, _use_triton=lambda device: device.type == "cpu" or original(device)):
        yield


@contextmanager
def small_head_tiles(enabled: bool = True):
    """Within the block, TRL's chunked LM head works through CPU_HEAD_TILE tiles (use on CPU runs only:
    the sizes are module settings, and a GPU's kernels are tuned to TRL's own)."""
    tokens, vocab = CPU_HEAD_TILE
    ck = _optional_module("trl.kernels.chunked_logprob") if enabled else None
    tu = _optional_module("trl.trainer.utils") if enabled else None
    with _swapped(ck, TOKEN_CHUNK_SIZE=tokens), _swapped(tu, _CHUNKED_LOGPROB_CHUNK_SIZE=vocab):
        yield


def _forward_tile_in_place(original, tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp,
                           z_sum, max_before_target, target_logit, vocab_start, n_cols, logit_scale, softcap, inv_t,
                           HAS_SOFTCAP, HAS_ENTROPY, HAS_LOG_SUM_SQ_PROBS, HAS_MEAN_LOGITS, HAS_IS_TOP1, BLOCK_SIZE):
    """TRL's forward fold of one (tokens x vocabulary columns) tile of logits into running max, sum of
    exponentials, entropy and target sums; the tile is scratch (TRL computes it again in backward)."""
    import torch

    plain = tile.dtype == torch.float32 and not (HAS_SOFTCAP or HAS_LOG_SUM_SQ_PROBS or HAS_MEAN_LOGITS) \
        and logit_scale == 1 and inv_t == 1
    if not plain:
        return original(tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
                        max_before_target, target_logit, vocab_start, n_cols, logit_scale, softcap, inv_t,
                        HAS_SOFTCAP, HAS_ENTROPY, HAS_LOG_SUM_SQ_PROBS, HAS_MEAN_LOGITS, HAS_IS_TOP1, BLOCK_SIZE)
    _fold_tile(tile, targets, running_max, sum_exp, x_sum_exp, max_before_target, target_logit, vocab_start, n_cols,
               HAS_ENTROPY, HAS_IS_TOP1)


def _fold_tile(tile, targets, running_max, sum_exp, x_sum_exp, max_before_target, target_logit, vocab_start: int,
               n_cols: int, entropy: bool, is_top1: bool):
    """Folds one fp32 tile of logits into the running statistics, in place; returns the tile's
    exp(logit - new running max) and the factor by which sums over earlier tiles rescale."""
    import torch

    local = targets - vocab_start
    here = (local >= 0) & (local < n_cols)
    target_logit.copy_(torch.where(here, tile.gather(-1, local.clamp(0, n_cols - 1).unsqueeze(-1)).squeeze(-1),
                                   target_logit))
    tile_max = tile.amax(-1)
    if is_top1:
        # a top-1 hit: the target is the first column with the row's largest logit. TRL keeps the max of
        # all columns before the target; the same decision needs less. A tile wholly before the target
        # adds its maximum. The target's own tile adds its maximum only where that first occurs before
        # the target (argmax gives the first); else nothing before the target reaches its value, or the
        # target is below the maximum and misses anyway
        before = local >= n_cols
        rows = here.nonzero().squeeze(-1)
        before[rows] = tile[rows].argmax(-1) < local[rows]
        max_before_target.copy_(torch.where(before, torch.maximum(max_before_target, tile_max), max_before_target))
    new_max = torch.maximum(running_max, tile_max)
    rescale = torch.exp(running_max - new_max)
    shifted = tile.sub_(new_max.unsqueeze(-1))
    e = torch.exp(shifted)
    tile_sum = e.sum(-1)
    sum_exp.mul_(rescale).add_(tile_sum)
    if entropy:  # sum(e * logits) = sum(e * shifted) + max * sum(e)
        x_sum_exp.mul_(rescale).add_(shifted.mul_(e).sum(-1) + new_max * tile_sum)
    running_max.copy_(new_max)
    return e, rescale


def _backward_tile_in_place(original, tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy,
                            vocab_start, n_cols, logit_scale, softcap, inv_t, HAS_SOFTCAP, HAS_LOGPROB_GRAD,
                            HAS_ENTROPY_GRAD, BLOCK_SIZE):
    """TRL's backward of one tile: the tile of logits becomes its gradient, g * (1[target] - p)."""
    import torch

    plain = tile.dtype == torch.float32 and HAS_LOGPROB_GRAD and not (HAS_SOFTCAP or HAS_ENTROPY_GRAD) \
        and logit_scale == 1 and inv_t == 1
    if not plain:
        return original(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols,
                        logit_scale, softcap, inv_t, HAS_SOFTCAP, HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD, BLOCK_SIZE)
    tile.sub_(log_z.unsqueeze(-1)).exp_().mul_(-grad_logprobs.unsqueeze(-1))
    local = targets - vocab_start
    rows = ((local >= 0) & (local < n_cols)).nonzero().squeeze(-1)
    tile[rows, local[rows]] += grad_logprobs[rows]


@contextmanager
def head_tiles_in_place(enabled: bool = True):
    """Within the block, TRL's chunked LM head works its tiles in place when it runs without Triton
    (CPUs); anything but the plain fp32 log-probability goes to TRL's own code."""
    ck = _optional_module("trl.kernels.chunked_logprob") if enabled else None
    with _swapped(ck, _forward_tile=partial(_forward_tile_in_place, getattr(ck, "_forward_tile", None)),
                  _backward_tile=partial(_backward_tile_in_place, getattr(ck, "_backward_tile", None))):
        yield


def decoder_layers(model) -> list:
    """The model's repeated blocks, by the class names transformers keeps whole when it splits a model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


# attention kernels as torch dispatches them (flash-attn's own kernels by their op namespace)
ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


def keep_attention_outputs(model) -> int:
    """Each checkpointed decoder layer saves its attention kernel's outputs in the forward pass, so
    that the recompute in backward skips attention (norms, projections and MLP are recomputed as
    before). Call once checkpointing is enabled."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    ops = {getattr(torch.ops.aten, name).default for name in ATTENTION_OPS if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):  # runs for every op of a checkpointed layer: no string work
        keep = op in ops or getattr(op, "namespace", "").startswith("flash_attn")
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    context = partial(create_selective_checkpoint_contexts, policy)
    for layer in decoder_layers(model):
        if layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = partial(layer._gradient_checkpointing_func, context_fn=context)


class CheckpointedLayers(TrainerCallback):
    """Once the Trainer has enabled checkpointing (on every layer), train.checkpoint_layers=n turns it
    off past the first n decoder layers, and train.checkpoint_attention keeps attention outputs.
    The first layers, not others: their recompute comes last in backward, when the activations of
    the layers after them are freed already. `layers` counts the checkpointed layers."""

    def __init__(self, first: Optional[int] = None, keep_attention: bool = False):
        self.first, self.keep_attention, self.layers = first, keep_attention, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = decoder_layers(model)
        for layer in layers[self.first:] if self.first is not None else []:
            layer.gradient_checkpointing = False
        self.layers = sum(layer.gradient_checkpointing for layer in layers)
        if self.keep_attention:
            keep_attention_outputs(model)

    def count(self, model) -> int:
        """The layers training checkpoints, without training: for a resumed run with only its wrap-up left."""
        n = len(decoder_layers(model))
        return n if self.first is None else min(self.first, n)


def compile_problem(device: str) -> Optional[str]:
    """Why torch.compile cannot build kernels on this device (on CPU: a C++ compiler and the Python
    headers), or None when it can. A tiny function is compiled: seconds the first time, then cached."""
    import torch

    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:  # whatever the toolchain raises: the run goes on or stops with this reason
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
    return None


def compile_wanted(setting, device: str, steps: int) -> bool:
    """train.compile resolved for this run: true, or auto on CPU runs of COMPILE_MIN_STEPS or more.
    Where torch.compile cannot build kernels, auto says why and trains without it; true stops."""
    from qlora.config import Switch
    from qlora.errors import UserError
    from qlora.models import say

    if setting is Switch.false or (setting is Switch.auto and (device != "cpu" or steps < COMPILE_MIN_STEPS)):
        return False
    problem = compile_problem(device)
    if problem and setting is Switch.true:
        raise UserError(f"train.compile=true: torch.compile cannot build kernels here ({problem}); on CPU it "
                        "needs a C++ compiler (g++) and the Python headers; install them, or set train.compile=false")
    if problem:
        say(f"train.compile=auto: torch.compile cannot build kernels here ({problem}); training without it")
    return problem is None


def liger_wanted(enabled: bool, device: str, model_path: str) -> bool:
    """train.liger_kernels resolved for this run, before the model loads: true only where Liger's
    kernels would be applied; a setting they cannot honour stops with the reason."""
    from qlora.errors import UserError

    if not enabled:
        return False
    if device != "cuda":
        raise UserError("train.liger_kernels=true: Liger's kernels are Triton kernels for GPUs; on CPU set "
                        "train.liger_kernels=false")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise UserError(f"train.liger_kernels=true needs the liger-kernel package ({e}): pip install "
                        "'qlora[liger]', or set train.liger_kernels=false") from None
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise UserError(f"train.liger_kernels=true: Liger has no kernels for model type {model_type!r} (it has "
                        f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); set train.liger_kernels=false")
    return True


@contextmanager
def compiled_layers(model, enabled: bool = True):
    """Within the block, each decoder layer's forward but the first is compiled (dynamic shapes);
    eager after it, so that evaluation and generation do not compile graphs of their own.

    What the compilation costs, and how it is kept down (SmolLM2, 2 cores): the layers share one
    graph, traced once. The first layer is left eager, since its input (the frozen embeddings'
    output) needs no gradient and would make torch trace and compile a second graph for 1/30 of
    the work. Float attributes (LoRA's scaling) are taken as constants, where torch would otherwise
    trace them as symbols, fail to keep them so and trace the layer again. And AOTAutograd's cache
    is allowed to hold graphs with our autograd functions (LoraMatmul4bit, which torch keeps out of it
    by default as it cannot vouch for every custom function; ours is traced whole into the graph that
    keys the cache). The first step's compilation went from 58 to 31 s with an empty inductor cache
    and from 34 to 7 s with a filled one.
    """
    import torch
    import torch._functorch.config as functorch_config

    layers = decoder_layers(model)[1:] if enabled else []
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    try:
        with _patched(torch._dynamo.config, specialize_float=True), \
                _patched(functorch_config, autograd_cache_allow_custom_autograd_functions=True):
            yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute: the class's forward again


def _patched(config, **values):
    """torch's config.patch of the values this torch version has (another may lack or rename a key)."""
    return config.patch(**{k: v for k, v in values.items() if hasattr(config, k)})
