"""`qlora plan`: peak training memory of a config on a GPU (or this machine), before loading anything.

The estimate adds up what training holds at its peak, from the model's shape alone:

- base weights: linear layers in 4 bits (4.127 bits a weight with double quantization, 4.5 without),
  embeddings, head and norms in the compute dtype;
- LoRA: fp32 weights, their gradients, and the optimizer state (8 bytes a weight for AdamW,
  about 2 for the 8-bit optimizers, which keep tensors under 4096 weights in 32 bits);
- a mixture's experts: held in 4 bits (or in the compute dtype), one layer's dequantized as it runs
  (every layer's, kept for the backward, without checkpointing), and in the backward, once the head's
  temporaries are gone, one more layer's where LoRA is on them: their gradient;
- activations: what each layer keeps for backward per token (about 6 hidden + 2 key/value +
  4 intermediate values, in the compute dtype), for every layer, or with gradient checkpointing
  each checkpointed layer's input (none on the GPU when offloaded; one more hidden value where its
  attention output is kept) plus one layer recomputed, and all of it for the layers not checkpointed;
- logits: on GPUs TRL's fused head holds only fp32 copies of the hidden states it scores; on CPU
  a measured per-token term (about 1.4 fp32 rows of the vocabulary per token with the head in
  small tiles, 2.9 with TRL's own tiles; 6.9 and 11 with PEFT's own LoRA forward, whose many
  temporaries leave glibc holding more, 6.0 with it on an unquantized base; 0.5 more without
  checkpointing, 0.8 more under train.bf16_base_products with it): the head's temporaries and what the
  allocator keeps;
- on CPU, the process itself: Python and the libraries, and what loading the model leaves in RSS
  (memory glibc keeps from the tensors freed while quantizing: none for an unquantized base); or,
  where loading peaks higher than training (a mixture of experts trained with checkpointing), that
  peak.

Tokens are counted as micro-batch x train.max_length: the planner plans for the longest batch.

Calibrated on CPU against the high end of measured peak RSS, which moves run to run with how glibc
reuses freed memory (one malloc arena; SmolLM2, 1024 to 4096 tokens: 1.3 to 5.8 GiB, its base in 4
bits or not, and a mixture of experts saved in bf16 with 151M of its 179M weights in experts, 1.3 to
2.4 GiB: each estimate within 8% of the highest run; tests/integration/test_plan.py keeps six cases
within 15% of the highest of three runs). On GPUs: against the plain stack's CUDA peaks in
shared/bench/README.md (TinyLlama-1.1B 2048 x 8: 3.53 estimated vs 3.85 GiB; Llama-3-8B 2048 x 4:
9.23 vs 9.52 GiB) and qlora's own TinyLlama run on an H200 (3.53 vs 3.86 GiB); other GPUs and
shapes are the model's word.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from qlora.errors import UserError
from qlora.model_shape import Shape, model_shape

GiB = 2 ** 30
# usable memory (GiB) of each GPU: the nominal size less what the driver and CUDA context take
GPUS: Dict[str, float] = {"T4": 14.7, "A10G": 22.0, "L4": 22.0, "A100-40": 39.0, "A100-80": 78.5, "H100": 78.5}
BF16 = {"T4": False, "A10G": True, "L4": True, "A100-40": True, "A100-80": True, "H100": True}
CPU_PROCESS_GB = 0.46  # RSS of Python with torch, transformers, peft, trl, bitsandbytes and datasets imported (measured)
# fp32 rows of the vocabulary a token adds to CPU peak RSS, by (train.fused_lora, train.small_head_tiles) (measured)
CPU_HEAD_ROWS = {(True, True): 1.4, (True, False): 2.9, (False, True): 6.9, (False, False): 11.0}
# the same with PEFT's LoRA on an unquantized base (quant.load_in_4bit=false) and small tiles (measured)
CPU_HEAD_ROWS_UNQUANTIZED = 6.0
# rows more without gradient checkpointing, where the head's temporaries come while every layer's
# activations are held (measured)
CPU_UNCHECKPOINTED_ROWS = 0.5
# rows more with train.bf16_base_products under gradient checkpointing (measured; none without it)
CPU_BF16_CHECKPOINTED_ROWS = 0.8
# what loading leaves in CPU RSS through training, per byte (in the compute dtype) of the tensors it
# quantized that glibc served from its heap, those under its largest mmap threshold: the memory it keeps
# from them once freed (measured on SmolLM2, all of whose linear layers are such; larger tensors, a
# mixture's experts or an 8B model's layers, are mapped apart and given back when freed)
CPU_LOAD_LEFT = 1.0
GLIBC_MMAP_MAX = 32 * 2 ** 20
# what loading itself peaks at beyond the weights it keeps, per byte of all weights in the compute dtype
# (measured on a mixture of experts saved in bf16, whose loading peaks above its training)
CPU_LOAD_PEAK = 1.15


BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' 8-bit optimizers keep smaller tensors' state in 32 bits


@dataclass
class Estimate:
    parts: Dict[str, float]  # GiB by component
    tokens: int  # tokens per micro-batch

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate(shape: Shape, *, r: int, batch: int, max_length: int, checkpointing: bool, optim: str,
             device: str, double_quant: bool = True, load_in_4bit: bool = True, packing: bool = False,
             small_head_tiles: bool = True, checkpoint_layers: Optional[int] = None,
             checkpoint_attention: bool = False, offload_checkpoints: bool = False,
             fused_lora: bool = True, one_row: bool = False, mask_bytes: int = 1,
             bf16_products: bool = False, experts_in_4bit: bool = True) -> Estimate:
    """Peak memory (GiB) of one training step, by component; the checkpoint_* settings as train.*,
    fused_lora whether train.fused_lora applies (4-bit layers, no LoRA dropout), bf16_products whether
    train.bf16_base_products does (CPUs with bf16 units), one_row whether
    data.padding_free lays each micro-batch in one row, mask_bytes what transformers' attention mask
    holds per query and key (SDPA's bool: 1; eager's: the compute dtype's; flash-attention: none),
    experts_in_4bit whether a mixture's experts are held in 4 bits (quant.experts_in_4bit)."""
    s = shape
    b = 4 if device == "cpu" else 2  # compute dtype bytes: fp32 on CPU, bf16/fp16 on GPUs
    linear = s.layers * sum(i * o for i, o in s.linears())
    other = s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden * (2 * s.layers + 1)
    experts = s.layers * s.expert_weights()
    bits = (4.127 if double_quant else 4.5) if load_in_4bit else 8 * b
    lora = s.layers * (sum(r * (i + o) for i, o in s.linears()) + s.expert_lora(r))
    # bitsandbytes' 8-bit optimizers keep two uint8 moments a weight and two fp32 scales a block of
    # 256, but AdamW's 8 bytes for tensors under min_8bit_size
    state = s.layers * sum(n * (8 if "8bit" not in optim or n < BNB_MIN_8BIT_SIZE else 2 + 8 / 256)
                           for i, o in s.linears() for n in (r * i, r * o))
    state += s.layers * s.expert_lora(r) * (8 if "8bit" not in optim else 2 + 8 / 256)
    tokens = batch * max_length
    # values one decoder layer keeps per token for backward: the normalized inputs, q/k/v, the
    # attention output, the MLP's gate, up, activation and product, each LoRA's rank-r intermediate
    # (a mixture of experts: those of each expert a token goes to, and its router's scores)
    mlp = s.intermediate + s.experts_per_token * s.expert_size
    per_layer = 4 * s.hidden + 2 * s.q_dim + 2 * s.kv_dim + 4 * mlp + 7 * r + s.experts
    # with checkpointing, the first n layers keep only their input (train.checkpoint_layers=n)
    checkpointed = s.checkpointed(checkpoint_layers) if checkpointing else 0
    kept = (0 if offload_checkpoints else s.hidden) + (s.hidden if checkpoint_attention else 0)
    act = tokens * (checkpointed * kept + (s.layers - checkpointed) * per_layer + (per_layer if checkpointed else 0)) * b
    # transformers' mask for packed rows is dense (block-diagonal); for one row it would span the whole
    # micro-batch, (batch x length)², kept through the step, but SDPA's (mask_bytes 1) is not built where
    # padding_free.segment_attention splits the row: no soft-capping, no window shorter than an example
    split = one_row and mask_bytes == 1 and not s.softcap and not (s.window and s.window < max_length)
    mask = 0 if split else (batch * max_length) ** 2 if one_row else batch * max_length ** 2 if packing else 0
    head_rows = (CPU_HEAD_ROWS_UNQUANTIZED if not load_in_4bit and small_head_tiles
                 else CPU_HEAD_ROWS[fused_lora, small_head_tiles])
    if checkpointing:
        head_rows += CPU_BF16_CHECKPOINTED_ROWS if bf16_products else 0.0
    else:
        head_rows += CPU_UNCHECKPOINTED_ROWS
    held, backward = experts_parts(s, b, bits, experts_in_4bit, checkpointing)
    parts = {
        # embeddings, head and norms stay in the compute dtype (adapters.attach_lora)
        "base weights": ((linear + s.beside) * bits / 8 + other * b) / GiB,
        **held,
        "LoRA weights + grads + optimizer": (lora * (4 + 4) + state) / GiB,
        "activations": act / GiB,
        **({"attention mask": mask * mask_bytes / GiB} if mask * mask_bytes else {}),
        # TRL's chunked head: on GPUs its fused Triton kernel never holds the logits, only fp32 copies
        # of the hidden states it scores (and their gradient). On CPU, measured peak RSS grows by about
        # 1.4 (tokens x vocab) fp32 arrays beyond the other parts with train.small_head_tiles, 2.9
        # without: the head's temporaries in its torch fallback, and memory glibc keeps from them
        # (6.9 and 11 without train.fused_lora: PEFT's temporaries leave glibc holding more). Without
        # checkpointing they come while every layer's activations are held, and runs hold 0.5 more: with
        # one coefficient for both, every run without checkpointing (SmolLM2, the mixture) was 5-12%
        # above its estimate and every run with it 1-16% below (bench/README.md).
        # train.bf16_base_products leaves glibc holding more where the layers are checkpointed (its
        # bf16 copies are freed between the fp32 tensors; the layers save the same tensors): SmolLM2
        # 8 x 256 peaked at 2.29-2.79 GiB with it, 2.0-2.3 without; without checkpointing, no more
        "logits": (head_rows * tokens * s.vocab * 4 if device == "cpu" else 2 * tokens * s.hidden * 4) / GiB,
    }
    # the head's temporaries are gone before the layers' backward, where a mixture's experts need more
    if backward > parts["logits"]:
        parts["experts in the backward, beyond the logits"] = backward - parts["logits"]
    if device == "cpu":  # RSS also counts the libraries, and what loading leaves behind
        parts["process"] = CPU_PROCESS_GB
        # the decoder's linear layers, each tensor under the threshold or not, and a vision tower's (all
        # under); none where nothing is quantized (quant.load_in_4bit=false), which frees nothing
        small = s.layers * sum(i * o * b for i, o in s.linears() if i * o * b < GLIBC_MMAP_MAX) + s.beside * b
        if load_in_4bit:
            parts["left by loading"] = CPU_LOAD_LEFT * small / GiB
        # a model whose loading peaks above its training: the weights it keeps, the file's pages read
        # through its memory map and the full-precision copies made to quantize them
        kept = parts["base weights"] + experts * (bits / 8 if experts_in_4bit else b) / GiB
        loading = CPU_PROCESS_GB + kept + CPU_LOAD_PEAK * (linear + s.beside + other + experts) * b / GiB
        if loading > sum(parts.values()):
            parts["loading's peak, above training's"] = loading - sum(parts.values())
    return Estimate(parts, tokens)


def experts_parts(s: Shape, b: int, bits: float, in_4bit: bool, checkpointing: bool) -> Tuple[Dict[str, float], float]:
    """A mixture's experts (GiB): as held and as the forward keeps them, and what the layers' backward
    needs besides, after the head's temporaries are gone. A running layer's are dequantized when held
    in 4 bits (LoRA on them added into that copy); with LoRA, one more layer's: its gradient in the
    backward (held in full, the copy qlora adds LoRA into). Without checkpointing each layer keeps the
    tensor it multiplied by until the backward; with it, the backward recomputes one layer at a time."""
    if not s.experts:
        return {}, 0.0
    layer = s.expert_weights() * b / GiB  # one layer's experts in the compute dtype
    lora = 1 if s.expert_lora_per_rank else 0
    if in_4bit:
        held = {"experts (4-bit)": s.layers * s.expert_weights() * bits / 8 / GiB}
        if checkpointing:
            return held, (1 + lora) * layer
        return {**held, "experts as they run": s.layers * layer}, lora * layer
    held = {"experts (not quantized)": s.layers * layer}
    if checkpointing:
        return held, lora * layer
    return {**held, **({"experts as they run": lora * layer * s.layers} if lora else {})}, 0.0


def suggest(fit, capacity: float, batch: int, accum: int, max_length: int, checkpointing: bool) -> Optional[str]:
    """Overrides that fit in `capacity` GiB with the same effective batch where possible."""
    effective = batch * accum
    for ckpt in ([checkpointing] if checkpointing else [False, True]):
        for length in (max_length, max_length // 2, max_length // 4):
            if length < 64:
                break
            for micro in [m for m in (64, 32, 16, 8, 4, 2, 1) if m <= max(batch, 1)]:
                if fit(micro, length, ckpt).total <= capacity:
                    over = [f"train.per_device_train_batch_size={micro}",
                            f"train.gradient_accumulation_steps={max(1, math.ceil(effective / micro))}"]
                    if length != max_length:
                        over.append(f"train.max_length={length}")
                    if ckpt != checkpointing:
                        over.append("train.gradient_checkpointing=true")
                    return " ".join(over)
    return None


def plan_cli(cfg) -> int:
    """The `qlora plan` verb."""
    from qlora.config import DistStrategy
    from qlora.experts_4bit import wanted as experts_wanted
    from qlora.models import attention_implementation, compute_dtype, model_config, weight_count
    from qlora.validation import (bf16_base_on, checkpointing_on, fused_lora_on, padding_free_on, pick_optimizer,
                                  refuse, validate_train)

    refuse(validate_train(cfg))
    gpu = cfg.gpu
    if gpu is not None and gpu not in GPUS:
        raise UserError(f"gpu={gpu}: choose one of {', '.join(GPUS)}, or leave it out for this machine")
    device, capacity, name = local_device() if gpu is None else ("cuda", GPUS[gpu], gpu)
    shape, folder = model_shape(cfg.model.name_or_path)
    t = cfg.train
    ckpt = checkpointing_on(t, device)
    optim = pick_optimizer(t.optim, device, cfg.dist.strategy is DistStrategy.fsdp_qlora)

    attn = attention_implementation(cfg.model, model_config(str(folder), cfg.model) if folder else None)
    one_row = padding_free_on(cfg.data.padding_free, device, cfg.data.packing, attn, False, 1.0)  # at most
    mask_bytes = {"flash_attention_2": 0, "eager": 4 if device == "cpu" else 2}.get(attn, 1)
    fused = fused_lora_on(t, device) and cfg.quant.load_in_4bit and cfg.lora.lora_dropout == 0 and not cfg.lora.use_dora

    def bf16_products(checkpointing: bool) -> bool:
        """Whether train.bf16_base_products applies where it counts: on CPU, under checkpointing (asked
        only there: the answer imports bitsandbytes, seconds that other plans do without)."""
        if not (checkpointing and device == "cpu"):
            return False
        import torch

        return bf16_base_on(t, device, compute_dtype(cfg.quant, device) == torch.float32, fused)

    experts_4bit = experts_wanted(cfg.quant, fsdp=cfg.dist.strategy is DistStrategy.fsdp_qlora)

    def fit(micro, length, checkpointing, first=t.checkpoint_layers, offload=t.offload_checkpoints):
        return estimate(shape, r=cfg.lora.r, batch=micro, max_length=length, checkpointing=checkpointing,
                        optim=optim, device=device, double_quant=cfg.quant.bnb_4bit_use_double_quant,
                        load_in_4bit=cfg.quant.load_in_4bit, packing=cfg.data.packing,
                        small_head_tiles=t.small_head_tiles, checkpoint_layers=first,
                        checkpoint_attention=t.checkpoint_attention, offload_checkpoints=offload,
                        fused_lora=fused, one_row=one_row, mask_bytes=mask_bytes,
                        bf16_products=bf16_products(checkpointing),
                        experts_in_4bit=experts_4bit)

    est = fit(t.per_device_train_batch_size, t.max_length, ckpt)
    print(f"qlora plan: {cfg.model.name_or_path} on {name} ({capacity:.1f} GiB usable)")
    tower = f" (and a vision tower of {weight_count(shape.beside)} weights, 4-bit, no LoRA)" if shape.beside else ""
    if shape.experts:
        tower += (f"; {shape.experts} experts a layer, {shape.experts_per_token} a token "
                  f"({weight_count(shape.layers * shape.expert_weights())} weights, "
                  f"{'with LoRA on each' if shape.expert_lora_per_rank else 'no LoRA on them'}, "
                  f"{'4-bit' if experts_4bit else 'not quantized'})")
    print(f"  {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}{tower}; LoRA r={cfg.lora.r} on every "
          f"linear layer; micro-batch {t.per_device_train_batch_size} x {t.max_length} tokens; gradient "
          f"checkpointing {checkpoint_words(t, shape) if ckpt else 'off'}; {optim}")
    if gpu and not BF16[gpu]:
        fix = ("set quant.bnb_4bit_compute_dtype=float16 (this config asks for bfloat16)"
               if cfg.quant.bnb_4bit_compute_dtype.value == "bfloat16" else "quant.bnb_4bit_compute_dtype=auto does that")
        print(f"  {gpu} has no bf16: compute in fp16; {fix}")
    width = max(len(k) for k in est.parts)
    for k, v in est.parts.items():
        print(f"  {k:<{width}}  {v:8.2f} GiB")
    print(f"  {'estimated peak':<{width}}  {est.total:8.2f} GiB  ({est.total / capacity:.0%} of {name}; "
          "for micro-batches as long as train.max_length)")
    micro, length = t.per_device_train_batch_size, t.max_length
    if est.total <= capacity:
        print("  fits as configured")
        faster = less_recompute(lambda ckpt, first: fit(micro, length, ckpt, first).total, capacity,
                                shape.checkpointed(t.checkpoint_layers)) if ckpt else None
        if faster:
            print(f"  room to spare: {faster[0]} recomputes less, so trains faster, and is estimated at "
                  f"{faster[1]:.2f} GiB")
        return 0
    hint = suggest(fit, capacity, micro, t.gradient_accumulation_steps, length, ckpt)
    if hint:
        print(f"  does not fit; this does (same effective batch): {hint}")
    else:
        print("  does not fit even at micro-batch 1 with a quarter of the length and checkpointing: "
              "use a bigger GPU, dist=fsdp_qlora over several, or a smaller model")
    if device == "cuda" and ckpt and not t.offload_checkpoints:
        offloaded = fit(micro, length, True, offload=True).total
        if offloaded <= capacity:
            print(f"  or keep the batch with train.offload_checkpoints=true ({offloaded:.2f} GiB; the "
                  "checkpointed inputs go to CPU memory and back, so each step is slower)")
    return 0


HEADROOM = 0.85  # speed levers are suggested where the estimate leaves this share of the memory unused


def less_recompute(total, capacity: float, checkpointed: int):
    """(override, GiB) of the fastest checkpointing that fits in HEADROOM of capacity: none at all,
    else the fewest checkpointed layers below the configured number; None if none fits."""
    if total(False, None) <= HEADROOM * capacity:
        return "train.gradient_checkpointing=false", total(False, None)
    for n in range(1, checkpointed):
        if total(True, n) <= HEADROOM * capacity:
            return f"train.checkpoint_layers={n}", total(True, n)
    return None


def checkpoint_words(t, shape: Shape) -> str:
    """How the run checkpoints, in words."""
    n = shape.checkpointed(t.checkpoint_layers)
    words = f"on (the first {n} of {shape.layers} layers" if n < shape.layers else "on (every layer"
    words += ", attention outputs kept" if t.checkpoint_attention else ""
    return words + (", inputs offloaded to CPU)" if t.offload_checkpoints else ")")


def local_device() -> Tuple[str, float, str]:
    """(device, usable GiB, name) of this machine."""
    import os

    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return "cuda", free / GiB, torch.cuda.get_device_name(0)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / GiB
    return "cpu", ram, "this CPU (available RAM)"
