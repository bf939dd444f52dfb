"""Checks of values and combinations, run before torch is imported (key names and types are
Hydra's job, at composition). Each problem reads 'key=value: what is wrong; how to fix it'."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import List, Optional

from qlora.config import ComputeDtype, DistStrategy, ExportFormat, LoraInit, QLoraConfig, Switch
from qlora.errors import UserError
from qlora.models import NAMED_TEMPLATES
from qlora.sources import check_path


# transformers' names (its SchedulerType and OptimizerNames, held here so that a bad value fails before
# torch is imported; tests/unit/test_config.py keeps them equal to the installed transformers')
SCHEDULERS = {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
              "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy"}
# the optimizers torch and bitsandbytes (qlora's dependencies) provide
OPTIMIZERS = {"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
              "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",
              "paged_lion_8bit", "paged_lion_32bit", "ademamix", "ademamix_8bit", "paged_ademamix_8bit",
              "paged_ademamix_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"}
# the others, with the module each imports (a package qlora does not install)
OPTIMIZER_MODULES = {"adamw_torch_4bit": "torchao", "adamw_torch_8bit": "torchao", "adamw_anyprecision": "torchdistx",
                     "adamw_torch_xla": "torch_xla", "adamw_torch_npu_fused": "torch_npu", "lomo": "lomo_optim",
                     "adalomo": "lomo_optim", "grokadamw": "grokadamw", "schedule_free_adamw": "schedulefree",
                     "schedule_free_radam": "schedulefree", "schedule_free_sgd": "schedulefree",
                     "stable_adamw": "optimi"}
# transformers' optimizers that project the gradients of chosen full weight matrices (its optim_target_modules)
FULL_WEIGHT_OPTIMIZERS = {"galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
                          "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "apollo_adamw",
                          "apollo_adamw_layerwise"}
TRACKERS = {"tensorboard", "wandb", "mlflow", "none"}
COMPILED_MIN_PADDING = 0.10  # train.compile and data.padding_free=auto: the padding share worth a split graph


def validate_train(cfg: QLoraConfig) -> List[str]:
    """Every problem of a train config, each as 'key: what is wrong; how to fix it'."""
    p: List[str] = []
    t, lo, d = cfg.train, cfg.lora, cfg.data

    def positive(key: str, value: float) -> None:
        if value <= 0:
            p.append(f"{key}={value}: must be > 0")

    positive("lora.r", lo.r)
    positive("lora.lora_alpha", lo.lora_alpha)
    if not 0 <= lo.lora_dropout < 1:
        p.append(f"lora.lora_dropout={lo.lora_dropout}: must be in [0, 1)")
    if not lo.target_modules:
        p.append("lora.target_modules=[]: name at least one module, or use [all-linear]")
    if lo.init is LoraInit.loftq:
        if not cfg.quant.load_in_4bit:
            p.append("lora.init=loftq starts LoRA at the 4-bit weights' error, and quant.load_in_4bit=false "
                     "leaves none; use lora.init=default")
        if cfg.dist.strategy is DistStrategy.fsdp_qlora:
            p.append("lora.init=loftq is not available under dist.strategy=fsdp_qlora (the weights are on one "
                     "rank while the model loads); use lora.init=default")
        if lo.use_dora:
            p.append("lora.init=loftq with lora.use_dora=true: DoRA's magnitudes are taken from the layer with "
                     "B = 0; use one of the two")
    positive("train.per_device_train_batch_size", t.per_device_train_batch_size)
    positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps)
    positive("train.learning_rate", t.learning_rate)
    positive("train.max_length", t.max_length)
    positive("train.logging_steps", t.logging_steps)
    positive("train.save_steps", t.save_steps)
    positive("train.max_grad_norm", t.max_grad_norm)
    if t.weight_decay < 0:
        p.append(f"train.weight_decay={t.weight_decay}: must be >= 0")
    if t.neftune_noise_alpha < 0:
        p.append(f"train.neftune_noise_alpha={t.neftune_noise_alpha}: must be >= 0 (0 = no noise)")
    if not 0 <= t.seed < 2 ** 32:
        p.append(f"train.seed={t.seed}: must be in [0, 2**32)")
    if d.show_examples < 0:
        p.append(f"data.show_examples={d.show_examples}: must be >= 0")
    if t.checkpoint_layers is not None and t.checkpoint_layers < 1:
        p.append(f"train.checkpoint_layers={t.checkpoint_layers}: must be >= 1 (or null for every layer; "
                 "train.gradient_checkpointing=false for none)")
    lever = checkpoint_lever(t)
    if lever and t.gradient_checkpointing is Switch.false:
        p.append(f"{lever} shapes gradient checkpointing, which train.gradient_checkpointing=false turns off; "
                 "set train.gradient_checkpointing=true (or auto on a GPU), or drop it")
    if t.bf16_base_products is Switch.true and t.fused_lora is Switch.false:
        p.append("train.bf16_base_products=true: the bf16 products are made within train.fused_lora's layers, "
                 "which train.fused_lora=false turns off; set train.fused_lora=auto, or drop it")
    if t.save_total_limit < 1:
        p.append(f"train.save_total_limit={t.save_total_limit}: keep at least 1 checkpoint")
    if t.eval_steps is not None and t.eval_steps <= 0:
        p.append(f"train.eval_steps={t.eval_steps}: must be > 0, or null for evaluation at the end only")
    elif t.eval_steps and t.save_steps % t.eval_steps:
        p.append(f"train.save_steps={t.save_steps}: must be a multiple of train.eval_steps={t.eval_steps}, so that "
                 "the best checkpoint (lowest eval loss) is one that was saved")
    if t.max_steps == 0 or t.max_steps < -1:
        p.append(f"train.max_steps={t.max_steps}: must be > 0, or -1 to run train.num_train_epochs")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        p.append(f"train.num_train_epochs={t.num_train_epochs}: must be > 0 (or set train.max_steps)")
    if not 0 <= t.warmup_ratio < 1:
        p.append(f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    if t.lr_scheduler_type not in SCHEDULERS:
        p.append(f"train.lr_scheduler_type={t.lr_scheduler_type}: choose one of {', '.join(sorted(SCHEDULERS))}")
    kwargs = t.lr_scheduler_kwargs
    if t.lr_scheduler_type in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and \
            ("min_lr" in kwargs) == ("min_lr_rate" in kwargs):
        p.append(f"train.lr_scheduler_type={t.lr_scheduler_type} decays to a floor: give one of "
                 "train.lr_scheduler_kwargs.min_lr_rate (a share of the peak, such as 0.1) or .min_lr")
    if t.lr_scheduler_type == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        p.append("train.lr_scheduler_type=warmup_stable_decay: give the steps of its decay, "
                 "train.lr_scheduler_kwargs.num_decay_steps")
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        p.append(f"train.early_stopping_patience={t.early_stopping_patience}: must be >= 1 (evaluations without "
                 "a lower held-out loss), or null for none")
    elif t.early_stopping_patience and not (t.eval_steps and (d.eval_path or d.eval_fraction > 0)):
        p.append(f"train.early_stopping_patience={t.early_stopping_patience} counts evaluations: set "
                 "train.eval_steps, with held-out data (data.eval_path or data.eval_fraction)")
    if t.early_stopping_threshold < 0:
        p.append(f"train.early_stopping_threshold={t.early_stopping_threshold}: must be >= 0")
    if t.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy") and not (
            t.eval_steps and (d.eval_path or d.eval_fraction > 0)):
        p.append(f"train.lr_scheduler_type={t.lr_scheduler_type} follows the held-out loss: set train.eval_steps, "
                 "with held-out data (data.eval_path or data.eval_fraction)")
    optim_problem = check_optimizer(t.optim)
    if optim_problem:
        p.append(optim_problem)
    bad = [r for r in t.report_to if r not in TRACKERS]
    if bad:
        p.append(f"train.report_to: unknown tracker {bad[0]!r}; choose from {', '.join(sorted(TRACKERS))}")
    if not 0 <= d.eval_fraction < 1:
        p.append(f"data.eval_fraction={d.eval_fraction}: must be in [0, 1)")
    elif d.eval_fraction > 0 and d.eval_path:
        p.append(f"data.eval_fraction={d.eval_fraction} holds out a share of the training rows, and "
                 f"data.eval_path={d.eval_path} is held-out data too: give one (data.eval_path=null for the share)")
    if not 0 <= d.max_bad_fraction < 1:
        p.append(f"data.max_bad_fraction={d.max_bad_fraction}: must be in [0, 1)")
    for i, src in enumerate(d.sources):
        if not src.path:
            p.append(f"data.sources[{i}].path: missing; each source needs a path")
        if src.weight <= 0:
            p.append(f"data.sources[{i}].weight={src.weight}: must be > 0 (1 = every row once)")
    if cfg.eval.exact_match and not (d.eval_path or d.eval_fraction > 0):
        p.append("eval.exact_match=true needs held-out data: set data.eval_path or data.eval_fraction "
                 "(or eval.exact_match=false)")
    p += validate_eval(cfg.eval)
    if cfg.resume not in ("none", "auto") and not Path(cfg.resume).is_dir():
        p.append(f"resume={cfg.resume}: no such checkpoint folder; use resume=auto or a checkpoints/checkpoint-N path")
    if cfg.dist.strategy is DistStrategy.fsdp_qlora:
        q = cfg.quant
        if not q.load_in_4bit:
            p.append("dist.strategy=fsdp_qlora shards a 4-bit model: set quant.load_in_4bit=true")
        if q.bnb_4bit_compute_dtype is ComputeDtype.auto or q.bnb_4bit_quant_storage.value != q.bnb_4bit_compute_dtype.value:
            p.append("dist.strategy=fsdp_qlora: FSDP shards all parameters as one dtype; set "
                     "quant.bnb_4bit_compute_dtype=bfloat16 and quant.bnb_4bit_quant_storage=bfloat16")
        if t.gradient_checkpointing is Switch.false:
            p.append("dist.strategy=fsdp_qlora needs train.gradient_checkpointing (auto or true) to fit")
        if t.optim.startswith("paged") or "8bit" in t.optim:
            p.append(f"train.optim={t.optim}: bitsandbytes optimizers do not shard under FSDP; "
                     "use train.optim=adamw_torch_fused")
    for key, path in [("data.path", d.path)] * (not d.sources) + [
            (f"data.sources[{i}].path", src.path) for i, src in enumerate(d.sources) if src.path] + [
            ("data.eval_path", d.eval_path)] * bool(d.eval_path):
        problem = check_path(key, path)
        if problem:
            p.append(problem)
    if cfg.model.chat_template and "{" not in cfg.model.chat_template and cfg.model.chat_template not in NAMED_TEMPLATES:
        _check_file("model.chat_template", cfg.model.chat_template, p)
    return p


def checkpoint_lever(t) -> Optional[str]:
    """The first checkpointing lever set away from its default, as key=value (None if none is)."""
    if t.checkpoint_layers is not None:
        return f"train.checkpoint_layers={t.checkpoint_layers}"
    if t.checkpoint_attention:
        return "train.checkpoint_attention=true"
    if t.offload_checkpoints:
        return "train.offload_checkpoints=true"
    return None


def checkpointing_on(t, device: str) -> bool:
    """Whether a run on `device` ("cuda" or "cpu") checkpoints: auto is on for GPUs only (on CPU it
    costs ~25% for little memory). Levers that need checkpointing, or a GPU, say so here."""
    on = t.gradient_checkpointing is Switch.true or (t.gradient_checkpointing is Switch.auto and device == "cuda")
    lever = checkpoint_lever(t)
    if lever and not on:
        raise UserError(f"{lever} shapes gradient checkpointing, which train.gradient_checkpointing="
                        f"{t.gradient_checkpointing.value} leaves off on {device}: set train.gradient_checkpointing=true")
    if t.offload_checkpoints and device != "cuda":
        raise UserError("train.offload_checkpoints=true moves checkpointed activations off a GPU; on CPU they "
                        "are in host memory already: drop it")
    return on


def fused_lora_on(t, device: str) -> bool:
    """Whether train.fused_lora applies on `device`: auto is on for CPU only, where it has been measured."""
    return t.fused_lora is Switch.true or (t.fused_lora is Switch.auto and device == "cpu")


def bf16_base_on(t, device: str, fp32: bool, fused: bool) -> bool:
    """train.bf16_base_products resolved for this run: it applies within train.fused_lora's layers on CPU
    in fp32 compute (16-bit compute multiplies in 16 bits already); a SmolLM2 step 1.11-1.50x with it
    (bench/README.md)."""
    return fused and device == "cpu" and fp32 and bf16_products_on(t.bf16_base_products)


def bf16_products_on(setting: Switch) -> bool:
    """train.bf16_base_products or gen.bf16_base_products: auto = on where the CPU has bf16 units
    (AVX512-BF16); elsewhere bf16 products run ~100x slower than fp32 ones. gen's: batched greedy
    generation 1.36-1.78x faster on SmolLM2, 98 of 100 demo answers the same (bench/README.md)."""
    if setting is Switch.false:
        return False
    from qlora.fused_lora import cpu_has_bf16_units

    return setting is Switch.true or cpu_has_bf16_units()


def padding_free_on(setting, device: str, packing: bool, attn: str, compiling: bool, padding: float) -> bool:
    """data.padding_free resolved for this run (attn: the model's attention implementation; padding:
    padding_share of its micro-batches). auto = on CPU with SDPA, unless data.packing has filled the
    rows already (bench/packing.py: packed rows 1.40x the padded batches' speed, the same rows end to
    end 1.28x, their many short examples each a small SDPA call), and under train.compile only where
    padding is at least COMPILED_MIN_PADDING of the tokens (its attention splits the compiled graphs:
    0.96x with 3% padding). true is correct with any attention: flash-attention reads the restarts,
    and eager attention gets transformers' mask."""
    if setting is not Switch.auto:
        return setting is Switch.true
    return device == "cpu" and attn == "sdpa" and not packing and (not compiling or padding >= COMPILED_MIN_PADDING)


def check_optimizer(optim: str) -> Optional[str]:
    """What is wrong with train.optim, or None: it must be auto or one of transformers' names that this
    installation can run on LoRA adapters."""
    if optim == "auto" or optim in OPTIMIZERS:
        return None
    if optim in FULL_WEIGHT_OPTIMIZERS:
        return (f"train.optim={optim}: GaLore and APOLLO train full weight matrices, where LoRA trains adapters "
                "beside frozen ones; use train.optim=auto (or adamw_torch_fused, paged_adamw_8bit, ...)")
    module = OPTIMIZER_MODULES.get(optim)
    if module is None:
        return (f"train.optim={optim}: not an optimizer transformers knows; use auto or one of "
                f"{', '.join(sorted(OPTIMIZERS | set(OPTIMIZER_MODULES)))}")
    if importlib.util.find_spec(module) is None:
        return (f"train.optim={optim} needs the Python module {module}, which is not installed: install it "
                "or use train.optim=auto")
    return None


def check_schedule(t, steps: int) -> None:
    """Builds the learning-rate schedule as transformers will at the first step, on a stand-in optimizer,
    so that an argument the schedule does not take (or a bad value) fails before the model loads."""
    import torch
    from transformers.optimization import get_scheduler

    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(t.lr_scheduler_type, stand_in, num_warmup_steps=math.ceil(t.warmup_ratio * steps),
                      num_training_steps=steps, scheduler_specific_kwargs=dict(t.lr_scheduler_kwargs))
    except (TypeError, ValueError) as e:
        raise UserError(f"train.lr_scheduler_kwargs={dict(t.lr_scheduler_kwargs)}: "
                        f"train.lr_scheduler_type={t.lr_scheduler_type} refuses them: {e}") from None


def pick_optimizer(optim: str, device: str, fsdp: bool = False) -> str:
    """The optimizer a run on `device` uses. auto: QLoRA's paged 8-bit AdamW on one GPU; PyTorch's fused
    AdamW on CPU (it steps 10x faster there than bitsandbytes' 8-bit AdamW, and paging is a CUDA thing)
    and under FSDP (bitsandbytes optimizers do not shard). A name given is kept: bitsandbytes runs its
    8-bit optimizers on CPU too, and its paged ones there as unpaged (see `optimizer_note`)."""
    if optim == "auto":
        return "paged_adamw_8bit" if device == "cuda" and not fsdp else "adamw_torch_fused"
    return optim


def optimizer_note(optim: str, device: str) -> Optional[str]:
    """What a user should know of the optimizer on this device, or None."""
    if device == "cpu" and optim.startswith("paged_"):
        return (f"train.optim={optim}: paging optimizer state out of GPU memory needs CUDA; on CPU bitsandbytes "
                "runs it unpaged (the same updates)")
    return None


def validate_merge(cfg: QLoraConfig) -> List[str]:
    """Every problem of a merge/export config."""
    from qlora.merge import parse_size

    m, p = cfg.merge, []
    for key in ("min_top1_agreement", "min_top1_agreement_nf4"):
        if not 0 <= getattr(m, key) <= 1:
            p.append(f"merge.{key}={getattr(m, key)}: must be in [0, 1]")
    if m.check_prompts < 1:
        p.append(f"merge.check_prompts={m.check_prompts}: the self-check needs at least 1 prompt")
    if m.check_max_tokens < 1:
        p.append(f"merge.check_max_tokens={m.check_max_tokens}: the self-check needs at least 1 token a prompt")
    try:
        parse_size(m.max_shard_size)
    except UserError as e:
        p.append(str(e))
    if cfg.export.format in (ExportFormat.gguf, ExportFormat.ollama):
        from qlora.gguf_types import k_quant_problem

        problem = k_quant_problem(cfg.export.gguf_type)
        if problem:
            p.append(problem)
    return p


def validate_eval(ev) -> List[str]:
    """Every problem of the evaluation settings (eval.*), for `qlora train` and `qlora eval`."""
    p: List[str] = []
    if ev.max_new_tokens <= 0:
        p.append(f"eval.max_new_tokens={ev.max_new_tokens}: must be > 0")
    if ev.batch_size <= 0:
        p.append(f"eval.batch_size={ev.batch_size}: must be > 0")
    if ev.max_examples is not None and ev.max_examples <= 0:
        p.append(f"eval.max_examples={ev.max_examples}: must be > 0, or null for every example")
    return p


def validate_gen(gen) -> List[str]:
    """Every problem of the generation settings (gen.*), as `qlora chat`'s /set takes them too."""
    p: List[str] = []
    if gen.max_new_tokens <= 0:
        p.append(f"gen.max_new_tokens={gen.max_new_tokens}: must be > 0")
    if gen.temperature <= 0:
        p.append(f"gen.temperature={gen.temperature}: must be > 0 (for the most likely token, gen.do_sample=false)")
    if not 0 < gen.top_p <= 1:
        p.append(f"gen.top_p={gen.top_p}: must be in (0, 1]")
    if gen.top_k < 0:
        p.append(f"gen.top_k={gen.top_k}: must be >= 0 (0 leaves it out)")
    if gen.repetition_penalty <= 0:
        p.append(f"gen.repetition_penalty={gen.repetition_penalty}: must be > 0 (1 leaves it out)")
    return p


def _check_file(key: str, path: str, problems: List[str]) -> None:
    f = Path(path).expanduser()
    if not f.exists():
        problems.append(f"{key}={path}: no such file")
    elif f.is_dir():
        problems.append(f"{key}={path}: is a folder; give a file")


def refuse(problems: List[str]) -> None:
    """Stop with every problem listed (exit 2), or return when there is none."""
    if problems:
        raise UserError("bad config:\n  " + "\n  ".join(problems))
