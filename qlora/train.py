"""`qlora train`: validate, load the 4-bit base, attach LoRA, train with TRL's SFTTrainer, save.

The run directory (see the README) is enough to resume, merge, chat and audit the run.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import time
import warnings
from dataclasses import dataclass
from functools import partial
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional

from qlora.checkpoints import (check_resumable, drop_metrics_after, early_stopping_count, fingerprint,
                               latest_checkpoint, load_best_adapter, load_checkpoint, step_of)
from qlora.config import DistStrategy, LoraInit, QLoraConfig, Resume
from qlora.validation import (bf16_base_on, check_schedule, checkpointing_on, fused_lora_on, padding_free_on,
                              optimizer_note, pick_optimizer, refuse, validate_train)
from qlora.distributed import close_process_group, is_main, world_size
from qlora.errors import Interrupted, UserError, WorkError


@dataclass
class Run:
    """What a finished training leaves in memory (the run directory holds the same on disk)."""
    run_dir: Path
    trainer: Any
    tokenizer: Any
    report: Dict[str, Any]


def train(cfg: QLoraConfig) -> int:
    """The `qlora train` verb."""
    fit(cfg)
    close_process_group()
    return 0


def fit(cfg: QLoraConfig, started: Optional[float] = None) -> Run:
    started = started or time.perf_counter()
    refuse(validate_train(cfg))
    run_dir, resume_from = prepare_run_dir(cfg)
    fp = fingerprint(cfg)  # as given: resuming compares the command line's config with it
    if resume_from:
        check_resumable(run_dir, cfg)

    import datasets
    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTTrainer

    from qlora.adapters import attach_lora, check_targets, keep_trainable_fp32
    from qlora.data import DataStats, collate_packed, pack_rows, split_examples, tokenize_examples
    from qlora.data_check import check_for_training
    from qlora.evaluate import exact_match, mean_loss
    from qlora.models import (compute_dtype, load_base_model, load_tokenizer, pad_like_tokenizer, pick_device,
                              resize_for_tokenizer, resolve_model, say)
    from qlora.dequant import fast_dequant, use_for_inference
    from qlora.fused_lora import fused_lora
    from qlora.one_pass_head import head_one_pass
    from qlora.padding_free import padding_share, segment_attention_for
    from qlora.guards import NonFinite, NonFiniteGuard, StopOnSignal
    from qlora.neftune import embedding_noise
    from qlora.loftq import loftq_start
    from qlora.speed import (CheckpointedLayers, compile_wanted, compiled_layers, head_tiles_in_place, liger_wanted,
                             small_head_tiles, trained_positions_only_on_cpu)
    from qlora.tracking import (RunLogger, package_versions, peak_memory_gb, plot_losses, readable_progress,
                                write_atomic)

    datasets.disable_progress_bars()  # our own lines say what the data holds
    t = cfg.train
    device = pick_device()
    dtype = compute_dtype(cfg.quant, device)
    checkpointing = checkpointing_on(t, device)
    fsdp = cfg.dist.strategy is DistStrategy.fsdp_qlora
    optim = pick_optimizer(t.optim, device, fsdp)
    if fsdp:
        if device != "cuda":
            raise UserError("dist.strategy=fsdp_qlora shards over GPUs; on CPU use dist=single (DDP under torchrun)")
        # read by transformers while loading: rank 0 reads the weights, the others get them by broadcast
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = str(cfg.dist.cpu_ram_efficient_loading).lower()
    set_seed(t.seed)

    t_load = time.perf_counter()
    path = resolve_model(cfg.model.name_or_path)
    liger = liger_wanted(t.liger_kernels, device, path)
    fused = fused_lora_on(t, device)
    bf16_base = bf16_base_on(t, device, dtype == torch.float32, fused)
    train_ex, eval_ex, stats = split_examples(cfg.data, t.seed)
    tokenizer = load_tokenizer(path, cfg.model, chat=any(ex.messages for ex in train_ex + eval_ex))
    kept: list = []
    train_rows = tokenize_examples(tokenizer, train_ex, cfg.data, t.max_length, stats, kept)
    check_for_training(tokenizer, kept, train_rows, stats, t.max_length)  # as `qlora data check`
    eval_rows = tokenize_examples(tokenizer, eval_ex, cfg.data, t.max_length, DataStats())
    say(f"data: {len(train_rows)} training and {len(eval_rows)} held-out examples; "
        f"{stats.trained_tokens} of {stats.tokens} tokens trained; {stats.truncated} truncated at "
        f"train.max_length={t.max_length}; dropped: {dict(stats.dropped) or 'none'}")
    if cfg.data.packing:
        n = len(train_rows)
        train_rows = pack_rows(train_rows, t.max_length)
        fill = sum(len(r["input_ids"]) for r in train_rows) / (len(train_rows) * t.max_length)
        say(f"packing: {n} examples in {len(train_rows)} rows of up to {t.max_length} tokens ({fill:.0%} full); "
            "each example attends only to itself")
    steps = t.max_steps if t.max_steps > 0 else math.ceil(
        len(train_rows) / (t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size())
        * t.num_train_epochs)
    # a run killed after its final checkpoint (max_steps, or the evaluation that stopped it early) only has
    # its wrap-up to do: transformers' Trainer, resumed there, would train one step more (it checks for
    # the end only after a step)
    finished = bool(resume_from) and (0 < t.max_steps <= step_of(Path(resume_from)) or bool(
        t.early_stopping_patience and t.early_stopping_patience <= early_stopping_count(Path(resume_from))))
    check_schedule(t, steps)
    check_targets(path, cfg.lora, cfg.model.trust_remote_code)
    compiling = not finished and compile_wanted(t.compile, device, steps)
    say(f"loading {cfg.model.name_or_path} on {device} "
        f"({'4-bit ' + cfg.quant.bnb_4bit_quant_type.value if cfg.quant.load_in_4bit else 'unquantized'}, "
        f"compute {str(dtype).replace('torch.', '')})")
    model = load_base_model(path, cfg.model, cfg.quant, device, dtype, place=not fsdp)
    grown = resize_for_tokenizer(model, tokenizer)
    pad_like_tokenizer(model, tokenizer)
    if grown:  # the added tokens' rows must be trained, and saved with the adapter
        keep = list(cfg.lora.modules_to_save or [])
        cfg.lora.modules_to_save = keep + [m for m in grown if m not in keep]
        say(f"model.chat_template={cfg.model.chat_template} added tokens: embeddings resized to {len(tokenizer)}; "
            f"training {', '.join(cfg.lora.modules_to_save)} in full (lora.modules_to_save)")
    model = attach_lora(model, cfg.lora, checkpointing, one_dtype=dtype if fsdp else None, compute_dtype=dtype)
    if cfg.lora.init is LoraInit.loftq and not resume_from:  # a resumed run takes LoRA from its checkpoint
        layers, missed, left = loftq_start(model, path)
        say(f"lora.init=loftq: LoRA in {layers} layers starts at the best rank-{cfg.lora.r} fix of their 4-bit "
            f"error, which it cuts to {left:.0%} (Frobenius norm)"
            + (f"; {missed} layers' original weights are not in the model's files under their names: "
               "their LoRA starts at zero" if missed else ""))
    padding = padding_share([len(r["input_ids"]) for r in train_rows], t.per_device_train_batch_size)
    one_row = padding_free_on(cfg.data.padding_free, device, cfg.data.packing, model.config._attn_implementation,
                              compiling, padding)
    if one_row:
        say(f"data.padding_free: each micro-batch's examples end to end in one row ({padding:.0%} of a padded "
            "micro-batch would be padding)")
    if bf16_base:
        say("train.bf16_base_products: the frozen base's products (4-bit layers, LM head) in bf16; "
            "activations, LoRA and their sums in fp32")
    note = optimizer_note(optim, device)
    if note:
        say(note)
    if device == "cpu" and cfg.quant.load_in_4bit:  # the evaluation after training, as `qlora eval` runs it
        use_for_inference(t.fast_dequant, "train.fast_dequant", bf16=bf16_base)
    load_seconds = time.perf_counter() - t_load

    if is_main():  # under torchrun, rank 0 alone writes
        from omegaconf import OmegaConf

        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if resume_from:
            drop_metrics_after(run_dir, step_of(Path(resume_from)))  # those steps are trained again
        else:
            write_atomic(run_dir / "fingerprint.json", json.dumps(fp, indent=2) + "\n")
    if "tensorboard" in t.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    logger = RunLogger(run_dir, started)
    stopper = StopOnSignal()
    guard = NonFiniteGuard(t.nan_policy.value, scaler_owns_overflow=device == "cuda" and dtype == torch.float16)
    args = trainer_args(cfg, run_dir, device, dtype, checkpointing, optim, liger, has_eval=bool(eval_rows))
    checkpointed = CheckpointedLayers(t.checkpoint_layers, t.checkpoint_attention)
    early = None
    if t.early_stopping_patience and args.load_best_model_at_end:
        early = EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold)
        # its count of evaluations without a lower loss goes on from the checkpoint's
        early.early_stopping_patience_counter = early_stopping_count(Path(resume_from)) if resume_from else 0
    with warnings.catch_warnings():  # TRL's note that its Liger switch goes in TRL 2: our pins hold TRL 1
        warnings.filterwarnings("ignore", message="`use_liger_kernel=True` is deprecated", category=FutureWarning)
        trainer = SFTTrainer(
            model=model, args=args, processing_class=tokenizer,
            callbacks=[logger, stopper, guard] + ([checkpointed] if checkpointing else []) + ([early] if early else []),
            data_collator=partial(collate_packed, pad_id=tokenizer.pad_token_id,
                                  one_row=one_row or "flash" in cfg.model.attn_implementation.value)
            if cfg.data.packing or one_row else None,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None)
    readable_progress(trainer)
    if not fsdp:  # FSDP flattens one dtype per shard: there LoRA stays in the compute dtype
        keep_trainable_fp32(trainer.model)  # undo TRL's bf16 cast of LoRA weights on quantized models

    em_before = None
    if cfg.eval.exact_match and eval_ex and is_main():  # the base alone: the same whether resumed or not
        with trainer.model.disable_adapter():
            em_before = exact_match(trainer.model, tokenizer, eval_ex, cfg.eval, desc="exact match before")
        say(f"held-out exact match before training: {em_before:.1%}")

    say(f"training; run directory {run_dir}" + (f"; resuming from {resume_from}" if resume_from else "")
        + ("; all train.max_steps are done: evaluating and saving" if finished else "")
        + ("; compiling the decoder layers first (train.compile: a minute or so)" if compiling else ""))
    if not finished:
        say(schedule_line(t, steps, len(train_rows), "packed rows" if cfg.data.packing else "examples"))
    stopper.install()
    compiled, dequant_kernel, attentions = 0, False, set()
    try:
        if finished:
            load_checkpoint(trainer, Path(resume_from))
            if early:  # as transformers' load_best_model_at_end would have at the end of training
                load_best_adapter(trainer, run_dir)
            checkpointed.layers = checkpointed.count(trainer.model) if checkpointing else 0
        else:
            with trained_positions_only_on_cpu(t.score_trained_only), \
                    compiled_layers(trainer.model, compiling) as compiled, \
                    small_head_tiles(t.small_head_tiles and device == "cpu"), \
                    head_tiles_in_place(t.head_tiles_in_place and device == "cpu"), \
                    head_one_pass(t.head_one_pass and t.head_tiles_in_place and device == "cpu", bf16_base), \
                    fused_lora(fused, bf16_base), \
                    embedding_noise(trainer.model, t.neftune_noise_alpha), \
                    segment_attention_for(trainer.model, one_row) as attentions, \
                    fast_dequant(t.fast_dequant and device == "cpu" and cfg.quant.load_in_4bit) as dequant_kernel:
                trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        raise WorkError("out of memory: lower train.per_device_train_batch_size or train.max_length, or set "
                        "train.gradient_checkpointing=true") from None
    except NonFinite as e:
        last = latest_checkpoint(run_dir)
        raise WorkError(
            f"{e}: the loss or gradients overflowed (with fp16 compute, try quant.bnb_4bit_compute_dtype="
            f"bfloat16 on a GPU that has it; else lower train.learning_rate), or set train.nan_policy=skip. "
            f"Last good checkpoint: {last or 'none yet'}") from None
    finally:
        stopper.uninstall()
    if stopper.received:
        raise Interrupted(f"{stopper.received} at step {trainer.state.global_step}: checkpoint saved in "
                          f"{latest_checkpoint(run_dir)}; continue with: {resume_command(run_dir)}")
    if guard.skipped:
        say(f"train.nan_policy=skip: skipped {guard.skipped} step(s) with non-finite gradients")
    train_seconds = logger.train_seconds
    if not is_main():
        return Run(run_dir, trainer, tokenizer, {})

    stopped_early = bool(early and early.early_stopping_patience_counter >= t.early_stopping_patience)
    if early and trainer.state.best_model_checkpoint:
        say("train.early_stopping_patience: " + (
            f"no lower held-out loss in {t.early_stopping_patience} evaluation(s), so stopped at step "
            f"{trainer.state.global_step}; " if stopped_early else "")
            + f"the adapter is the best checkpoint's, {Path(trainer.state.best_model_checkpoint).name} "
              f"(held-out loss {trainer.state.best_metric:.4g})")
    save_adapter(trainer.model, tokenizer, run_dir / "adapter")  # first: whatever the evaluation meets
    # the same code as `qlora eval`: mean loss per trained token
    eval_loss = mean_loss(trainer.model, eval_rows, t.per_device_train_batch_size) if eval_rows else None
    em_after = exact_match(trainer.model, tokenizer, eval_ex, cfg.eval) if (cfg.eval.exact_match and eval_ex) else None

    losses = [r["loss"] for r in logger.records if isinstance(r.get("loss"), float)]
    tokens = max([r.get("tokens", 0) for r in logger.records] or [0])  # over the whole run, resumed or not
    if eval_loss is not None:
        logger.records.append({"step": trainer.state.global_step, "eval_loss": eval_loss})
    report = dict(
        # seconds and speed of this process's training (after a resume, of the steps it trained)
        steps=trainer.state.global_step, train_tokens=int(tokens), train_seconds=round(train_seconds, 3),
        tokens_per_second=round(logger.session_tokens / train_seconds, 2) if train_seconds > 0 else None,
        load_seconds=round(load_seconds, 2), time_to_first_step_seconds=(
            None if logger.time_to_first_step is None else round(logger.time_to_first_step, 2)),
        peak_memory_gb=round(peak_memory_gb(device), 3),
        device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        compute_dtype=str(dtype).replace("torch.", ""), gradient_checkpointing=checkpointing,
        checkpointed_layers=checkpointed.layers, liger_kernels=liger, fused_lora=fused, bf16_base_products=bf16_base,
        compiled_layers=compiled, dequant_kernel=dequant_kernel,
        padding_free_attention=", ".join(sorted(attentions)) or model.config._attn_implementation if one_row else None,
        skipped_steps=guard.skipped, loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
        eval_loss=eval_loss, eval_exact_match=em_after, eval_exact_match_before=em_before,
        best_checkpoint=trainer.state.best_model_checkpoint, best_eval_loss=trainer.state.best_metric,
        stopped_early=stopped_early if early else None,
        train_examples=len(train_rows), eval_examples=len(eval_rows),
        data=dict(rows=stats.rows, dropped=dict(stats.dropped), truncated=stats.truncated,
                  trained_tokens_per_epoch=stats.trained_tokens),
        versions=package_versions(),
    )
    write_atomic(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    plot_losses(logger.records, run_dir / "loss.png")
    say(f"done in {time.perf_counter() - started:.0f} s: {report['steps']} steps, "
        + (f"{report['tokens_per_second']:,.1f} tokens/s, " if report["tokens_per_second"] else "")
        + (f"loss {report['loss_first']:.4g} -> {report['loss_last']:.4g}" if losses else "no loss logged")
        + (f", held-out exact match {em_before:.1%} -> {em_after:.1%}" if em_after is not None else ""))
    say(f"talk to it: qlora chat adapter={shlex.quote(str(run_dir))}")
    print(run_dir)
    return Run(run_dir, trainer, tokenizer, report)


def schedule_line(t, steps: int, rows: int, what: str) -> str:
    """How many steps of how many rows, and what share of the data that is: a 10-hour run shows as one
    before it starts."""
    ranks = world_size()
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * ranks
    return (f"{steps} optimizer steps of {per_step} {what} ({t.per_device_train_batch_size} a micro-batch"
            + (f" x {t.gradient_accumulation_steps} accumulated" if t.gradient_accumulation_steps > 1 else "")
            + (f" x {ranks} processes" if ranks > 1 else "") + f"): {steps * per_step / max(rows, 1):.2f} "
            f"epoch(s) of {rows}")


def default_output_dir(cfg: QLoraConfig, suffix: str = "") -> str:
    """outputs/<recipe>/<YYYYmmdd-HHMMSS><suffix>: where a run (or a sweep, suffix -sweep) goes unless told."""
    return f"outputs/{cfg.recipe or 'demo'}/{datetime.now():%Y%m%d-%H%M%S}{suffix}"


def prepare_run_dir(cfg: QLoraConfig):
    """The run directory (not created yet) and the checkpoint to resume from, if any."""
    from qlora.models import say

    resume = cfg.resume
    default = default_output_dir(cfg)
    if cfg.output_dir is None and resume not in (Resume.none.value, Resume.auto.value):
        default = str(Path(resume).resolve().parent.parent)  # RUN/checkpoints/checkpoint-N
    if cfg.output_dir is None and world_size() > 1:
        raise UserError("under torchrun / accelerate launch, give output_dir=RUN_DIR (every rank must agree)")
    run_dir = Path(cfg.output_dir or default).expanduser().resolve()
    check_writable("output_dir", run_dir)
    if resume == Resume.none.value:
        if is_main() and run_dir.exists() and any(run_dir.iterdir()):
            if not cfg.overwrite:
                raise UserError(f"output_dir={run_dir} exists and is not empty; pass resume=auto to continue "
                                "that run, overwrite=true to replace it, or another output_dir")
            shutil.rmtree(run_dir)
        return run_dir, None
    if resume == Resume.auto.value:
        if cfg.output_dir is None:
            raise UserError("resume=auto needs the run to continue: add output_dir=RUN_DIR")
        last = latest_checkpoint(run_dir)
        if last is not None:
            return run_dir, str(last)
        # nothing to continue yet: the same command starts the run and, once it has a checkpoint, continues it
        empty = not run_dir.exists() or not any(run_dir.iterdir())
        unfinished = (run_dir / "fingerprint.json").is_file() and not (run_dir / "report.json").exists()
        if not (empty or unfinished):
            raise UserError(f"resume=auto: no whole checkpoint in {run_dir / 'checkpoints'}, and the folder holds "
                            "something else; give the run's output_dir, or another output_dir to start fresh")
        say(f"resume=auto: no checkpoint in {run_dir} yet; starting the run"
            + (" again (the last start ended before its first checkpoint)" if unfinished else ""))
        if unfinished and is_main():
            shutil.rmtree(run_dir)
        return run_dir, None
    return run_dir, str(Path(resume).resolve())


def check_writable(key: str, folder: Path) -> None:
    """The folder can be created (or written) where it is, before hours of work go into it."""
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key}={folder}: cannot write there ({parent} is "
                        f"{'not a folder' if not parent.is_dir() else 'not writable'}); choose another folder")


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run."""
    import sys

    keep = [a for a in sys.argv[2:] if a.split("=")[0] not in ("output_dir", "resume", "overwrite")]
    return " ".join(["qlora train", *map(shlex.quote, keep), f"resume=auto output_dir={shlex.quote(str(run_dir))}"])


def trainer_args(cfg: QLoraConfig, run_dir: Path, device: str, dtype, checkpointing: bool, optim: str,
                 liger: bool, has_eval: bool):
    """TRL's SFTConfig from our keys, with the flags each device needs."""
    import torch
    from trl import SFTConfig

    t = cfg.train
    reporters = [r for r in t.report_to if r != "none"]
    fsdp = cfg.dist.strategy is DistStrategy.fsdp_qlora
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio,
        lr_scheduler_kwargs=dict(t.lr_scheduler_kwargs),
        weight_decay=t.weight_decay, optim=optim, max_grad_norm=t.max_grad_norm,
        seed=t.seed, data_seed=t.seed, max_length=t.max_length,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (t.eval_steps and has_eval) else "no", eval_steps=t.eval_steps,
        # the checkpoint with the lowest eval loss is kept however many newer ones rotate out
        metric_for_best_model="eval_loss" if (t.eval_steps and has_eval) else None, greater_is_better=False,
        # with early stopping, the adapter a run ends with is the best checkpoint's
        load_best_model_at_end=bool(t.early_stopping_patience and t.eval_steps and has_eval),
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs=checkpoint_kwargs(t) if checkpointing else None,
        # AMP on GPUs only: on CPU the compute dtype is fp32 and LoRA weights are fp32
        bf16=device == "cuda" and dtype == torch.bfloat16, fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu", use_liger_kernel=liger, report_to=reporters or "none", dataloader_num_workers=0,
        packing=False, dataset_num_proc=None, ddp_find_unused_parameters=False,
        # kept in checkpoints, so a resumed run counts on
        include_num_input_tokens_seen="non_padding",
        **fsdp_args(cfg) if fsdp else {})


def checkpoint_kwargs(t) -> dict:
    """How transformers' Trainer checkpoints: non-reentrant, the inputs held in host memory with
    train.offload_checkpoints. Which layers, and what they keep: speed.CheckpointedLayers."""
    return {"use_reentrant": False, "offload": t.offload_checkpoints}


def fsdp_args(cfg: QLoraConfig) -> dict:
    """Trainer arguments of FSDP over a 4-bit model: full sharding, PEFT-aware wrapping."""
    return dict(
        fsdp="full_shard auto_wrap" + (" offload" if cfg.dist.offload_params else ""),
        fsdp_config={"use_orig_params": False, "sync_module_states": True,
                     "cpu_ram_efficient_loading": cfg.dist.cpu_ram_efficient_loading,
                     "backward_prefetch": "backward_pre", "forward_prefetch": False})


def save_adapter(model, tokenizer, target: Path) -> None:
    """The adapter in PEFT's own format, with the tokenizer and chat template; written aside, then renamed."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
