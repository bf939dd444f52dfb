"""`qlora train`: validate, load the 4-bit base, attach LoRA, train with TRL's SFTTrainer, save.

`fit` reads as a run goes: the run directory, how this machine trains (Setup), the data, the model,
the trainer, the steps, then the adapter, the evaluation and report.json. The run directory (see the
README) is enough to resume, merge, chat and audit the run; qlora/run_dir.py holds its rules.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

from qlora.checkpoints import (check_resumable, drop_metrics_after, early_stopping_count, fingerprint,
                               latest_checkpoint, load_best_adapter, load_checkpoint, step_of)
from qlora.config import DistStrategy, LoraInit, QLoraConfig
from qlora.distributed import close_process_group, is_main, world_size
from qlora.errors import Interrupted, UserError, WorkError
from qlora.models import resolve_model, say
from qlora.run_dir import prepare_run_dir, resume_command, save_adapter
from qlora.validation import (bf16_base_on, check_schedule, checkpointing_on, fused_lora_on, padding_free_on,
                              optimizer_note, pick_optimizer, refuse, validate_train)


@dataclass
class Run:
    """What a finished training leaves in memory (the run directory holds the same on disk)."""
    run_dir: Path
    trainer: Any
    tokenizer: Any
    report: Dict[str, Any]


@dataclass
class Setup:
    """How this run trains on this machine: the device, the precision and the speed levers, each decided
    as soon as what it depends on is known (the model's path, the number of steps, the loaded model)."""
    device: str
    dtype: Any
    fsdp: bool
    checkpointing: bool
    optim: str
    fused: bool
    bf16_base: bool
    liger: bool = False
    compiling: bool = False
    one_row: bool = False


@dataclass
class Data:
    """The examples (exact match reads them) and their tokenized rows (training and the held-out loss)."""
    tokenizer: Any
    train_ex: List[Any]
    eval_ex: List[Any]
    train_rows: List[Dict[str, Any]]
    eval_rows: List[Dict[str, Any]]
    stats: Any


@dataclass
class Watchers:
    """The trainer's callbacks of ours: metrics and timing, Ctrl-C, non-finite steps, checkpointing, early stop."""
    logger: Any
    stopper: Any
    guard: Any
    checkpointed: Any
    early: Any


def train(cfg: QLoraConfig) -> int:
    """The `qlora train` verb."""
    fit(cfg)
    close_process_group()
    return 0


def fit(cfg: QLoraConfig, started: Optional[float] = None) -> Run:
    """Train as `qlora train` does (from Python too: api.train); the run stays in memory for the caller."""
    started = started or time.perf_counter()
    refuse(validate_train(cfg))
    run_dir, resume_from = prepare_run_dir(cfg)
    fp = fingerprint(cfg)  # as given: resuming compares the command line's config with it
    if resume_from:
        check_resumable(run_dir, cfg)
    t_load = time.perf_counter()
    path = resolve_model(cfg.model.name_or_path)  # before the heavy imports: a hub id's problems in a second

    import datasets
    from transformers import set_seed

    from qlora.adapters import check_targets
    from qlora.dequant import use_for_inference
    from qlora.evaluate import graded_answers, matched_share
    from qlora.speed import compile_wanted, liger_wanted
    from qlora.tracking import schedule_line

    datasets.disable_progress_bars()  # our own lines say what the data holds
    t = cfg.train
    setup = choose_setup(cfg)
    set_seed(t.seed)
    setup.liger = liger_wanted(t.liger_kernels, setup.device, path)
    data = read_data(cfg, path)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(
        len(data.train_rows) / (t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size())
        * t.num_train_epochs)
    finished = all_steps_done(t, resume_from)
    check_schedule(t, steps)
    check_targets(path, cfg.lora, cfg.model.trust_remote_code)
    setup.compiling = not finished and compile_wanted(t.compile, setup.device, steps)
    model = load_model(cfg, path, data.tokenizer, setup, loftq=cfg.lora.init is LoraInit.loftq and not resume_from)
    choose_padding_free(cfg, setup, model, data.train_rows)
    if setup.bf16_base:
        say("train.bf16_base_products: the frozen base's products (4-bit layers, LM head) in bf16; "
            "activations, LoRA and their sums in fp32")
    note = optimizer_note(setup.optim, setup.device)
    if note:
        say(note)
    if setup.device == "cpu" and cfg.quant.load_in_4bit:  # the evaluation after training, as `qlora eval` runs it
        use_for_inference(t.fast_dequant, "train.fast_dequant", bf16=setup.bf16_base)
    load_seconds = time.perf_counter() - t_load

    write_run_start(cfg, run_dir, fp, resume_from)
    trainer, watch = make_trainer(cfg, run_dir, model, data, setup, resume_from, started)
    before = None  # the base's answers to the held-out prompts: the same whether resumed or not
    if cfg.eval.exact_match and data.eval_ex and is_main():
        with trainer.model.disable_adapter():
            before = graded_answers(trainer.model, data.tokenizer, data.eval_ex, cfg.eval, desc="exact match before")
        say(f"held-out exact match before training: {matched_share(before):.1%}")

    say(f"training; run directory {run_dir}" + (f"; resuming from {resume_from}" if resume_from else "")
        + ("; all train.max_steps are done: evaluating and saving" if finished else "")
        + ("; compiling the decoder layers first (train.compile: a minute or so)" if setup.compiling else ""))
    if not finished:
        say(schedule_line(t, steps, len(data.train_rows), "packed rows" if cfg.data.packing else "examples"))
    used = train_steps(cfg, trainer, setup, watch, run_dir, resume_from, finished)
    if watch.guard.skipped:
        say(f"train.nan_policy=skip: skipped {watch.guard.skipped} step(s) with non-finite gradients")
    if not is_main():
        return Run(run_dir, trainer, data.tokenizer, {})
    report = finish(cfg, run_dir, trainer, data, setup, watch, used, before, load_seconds)
    return Run(run_dir, trainer, data.tokenizer, report)


def choose_setup(cfg: QLoraConfig) -> Setup:
    """The device, precision, checkpointing, optimizer and LoRA levers; FSDP's loading switches set."""
    import torch

    from qlora.models import compute_dtype, pick_device

    t = cfg.train
    device = pick_device()
    dtype = compute_dtype(cfg.quant, device)
    fsdp = cfg.dist.strategy is DistStrategy.fsdp_qlora
    if fsdp:
        if device != "cuda":
            raise UserError("dist.strategy=fsdp_qlora shards over GPUs; on CPU use dist=single (DDP under torchrun)")
        # read by transformers while loading: rank 0 reads the weights, the others get them by broadcast
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = str(cfg.dist.cpu_ram_efficient_loading).lower()
    fused = fused_lora_on(t, device)
    return Setup(device=device, dtype=dtype, fsdp=fsdp, checkpointing=checkpointing_on(t, device),
                 optim=pick_optimizer(t.optim, device, fsdp), fused=fused,
                 bf16_base=bf16_base_on(t, device, dtype == torch.float32, fused))


def read_data(cfg: QLoraConfig, path: str) -> Data:
    """The training and held-out examples, the tokenizer, and the rows it makes of them; checked as
    `qlora data check` checks them, packed with data.packing, and summed up in a line."""
    from qlora.data import DataStats, pack_rows, split_examples, tokenize_examples
    from qlora.data_check import check_for_training
    from qlora.models import load_tokenizer

    t = cfg.train
    train_ex, eval_ex, stats = split_examples(cfg.data, t.seed)
    tokenizer = load_tokenizer(path, cfg.model, chat=any(ex.messages for ex in train_ex + eval_ex))
    kept: list = []
    train_rows = tokenize_examples(tokenizer, train_ex, cfg.data, t.max_length, stats, kept)
    check_for_training(tokenizer, kept, train_rows, stats, t.max_length)
    eval_rows = tokenize_examples(tokenizer, eval_ex, cfg.data, t.max_length, DataStats())
    say(f"data: {len(train_rows)} training and {len(eval_rows)} held-out examples; "
        f"{stats.trained_tokens} of {stats.tokens} tokens trained; {stats.truncated} truncated at "
        f"train.max_length={t.max_length}; dropped: {dict(stats.dropped) or 'none'}")
    if stats.system_folded:
        say(f"data: the chat template has no place for a system message before an answer (it raises on one, or "
            f"writes it with the last user turn only), so the system message of {stats.system_folded} example(s) "
            "opens the first user turn, as Gemma 3's template writes it")
    if cfg.data.packing:
        n = len(train_rows)
        train_rows = pack_rows(train_rows, t.max_length)
        fill = sum(len(r["input_ids"]) for r in train_rows) / (len(train_rows) * t.max_length)
        say(f"packing: {n} examples in {len(train_rows)} rows of up to {t.max_length} tokens ({fill:.0%} full); "
            "each example attends only to itself")
    return Data(tokenizer, train_ex, eval_ex, train_rows, eval_rows, stats)


def all_steps_done(t, resume_from: Optional[str]) -> bool:
    """A run killed after its final checkpoint (max_steps, or the evaluation that stopped it early) only has
    its wrap-up to do: transformers' Trainer, resumed there, would train one step more (it checks for the
    end only after a step)."""
    if not resume_from:
        return False
    return 0 < t.max_steps <= step_of(Path(resume_from)) or bool(
        t.early_stopping_patience and t.early_stopping_patience <= early_stopping_count(Path(resume_from)))


def load_model(cfg: QLoraConfig, path: str, tokenizer, setup: Setup, loftq: bool):
    """The base in 4 bits (or as quant says), its embeddings grown for added tokens, LoRA attached, and
    with lora.init=loftq LoRA set to the best low-rank fix of the 4-bit error."""
    from qlora.adapters import attach_lora
    from qlora.loftq import loftq_start
    from qlora.models import load_base_model, pad_like_tokenizer, resize_for_tokenizer

    say(f"loading {cfg.model.name_or_path} on {setup.device} "
        f"({'4-bit ' + cfg.quant.bnb_4bit_quant_type.value if cfg.quant.load_in_4bit else 'unquantized'}, "
        f"compute {str(setup.dtype).replace('torch.', '')})")
    model = load_base_model(path, cfg.model, cfg.quant, setup.device, setup.dtype, place=not setup.fsdp)
    grown = resize_for_tokenizer(model, tokenizer)
    pad_like_tokenizer(model, tokenizer)
    if grown:  # the added tokens' rows must be trained, and saved with the adapter
        keep = list(cfg.lora.modules_to_save or [])
        cfg.lora.modules_to_save = keep + [m for m in grown if m not in keep]
        say(f"model.chat_template={cfg.model.chat_template} added tokens: embeddings resized to {len(tokenizer)}; "
            f"training {', '.join(cfg.lora.modules_to_save)} in full (lora.modules_to_save)")
    model = attach_lora(model, cfg.lora, setup.checkpointing, one_dtype=setup.dtype if setup.fsdp else None,
                        compute_dtype=setup.dtype)
    if loftq:
        layers, missed, left = loftq_start(model, path)
        say(f"lora.init=loftq: LoRA in {layers} layers starts at the best rank-{cfg.lora.r} fix of their 4-bit "
            f"error, which it cuts to {left:.0%} (Frobenius norm)"
            + (f"; {missed} layers' original weights are not in the model's files under their names: "
               "their LoRA starts at zero" if missed else ""))
    return model


def choose_padding_free(cfg: QLoraConfig, setup: Setup, model, train_rows) -> None:
    """data.padding_free, now that the model's attention and the rows' padding are known."""
    from qlora.padding_free import padding_share

    padding = padding_share([len(r["input_ids"]) for r in train_rows], cfg.train.per_device_train_batch_size)
    setup.one_row = padding_free_on(cfg.data.padding_free, setup.device, cfg.data.packing,
                                    model.config._attn_implementation, setup.compiling, padding)
    if setup.one_row:
        say(f"data.padding_free: each micro-batch's examples end to end in one row ({padding:.0%} of a padded "
            "micro-batch would be padding)")


def write_run_start(cfg: QLoraConfig, run_dir: Path, fp: Dict[str, Any], resume_from: Optional[str]) -> None:
    """config.yaml and, for a new run, fingerprint.json; a resumed run drops the metrics it trains again."""
    if is_main():  # under torchrun, rank 0 alone writes
        from omegaconf import OmegaConf

        from qlora.tracking import write_atomic

        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if resume_from:
            drop_metrics_after(run_dir, step_of(Path(resume_from)))  # those steps are trained again
        else:
            write_atomic(run_dir / "fingerprint.json", json.dumps(fp, indent=2) + "\n")
    if "tensorboard" in cfg.train.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")


def make_trainer(cfg: QLoraConfig, run_dir: Path, model, data: Data, setup: Setup, resume_from: Optional[str],
                 started: float):
    """TRL's SFTTrainer over the rows, with our callbacks, collator and console lines."""
    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    from qlora.adapters import keep_trainable_fp32
    from qlora.data import collate_packed
    from qlora.guards import NonFiniteGuard, StopOnSignal
    from qlora.speed import CheckpointedLayers
    from qlora.tracking import RunLogger, readable_progress
    from qlora.trainer_args import trainer_args

    t = cfg.train
    args = trainer_args(cfg, run_dir, setup.device, setup.dtype, setup.checkpointing, setup.optim, setup.liger,
                        has_eval=bool(data.eval_rows))
    early = None
    if t.early_stopping_patience and args.load_best_model_at_end:
        early = EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold)
        # its count of evaluations without a lower loss goes on from the checkpoint's
        early.early_stopping_patience_counter = early_stopping_count(Path(resume_from)) if resume_from else 0
    watch = Watchers(
        logger=RunLogger(run_dir, started), stopper=StopOnSignal(),
        guard=NonFiniteGuard(t.nan_policy.value,
                             scaler_owns_overflow=setup.device == "cuda" and setup.dtype == torch.float16),
        checkpointed=CheckpointedLayers(t.checkpoint_layers, t.checkpoint_attention), early=early)
    callbacks = [watch.logger, watch.stopper, watch.guard] + ([watch.checkpointed] if setup.checkpointing else []) \
        + ([early] if early else [])
    one_row_collator = setup.one_row or "flash" in cfg.model.attn_implementation.value
    with warnings.catch_warnings():  # TRL's note that its Liger switch goes in TRL 2: our pins hold TRL 1
        warnings.filterwarnings("ignore", message="`use_liger_kernel=True` is deprecated", category=FutureWarning)
        trainer = SFTTrainer(
            model=model, args=args, processing_class=data.tokenizer, callbacks=callbacks,
            data_collator=partial(collate_packed, pad_id=data.tokenizer.pad_token_id, one_row=one_row_collator)
            if cfg.data.packing or setup.one_row else None,
            train_dataset=Dataset.from_list(data.train_rows),
            eval_dataset=Dataset.from_list(data.eval_rows) if data.eval_rows else None)
    readable_progress(trainer)
    if not setup.fsdp:  # FSDP flattens one dtype per shard: there LoRA stays in the compute dtype
        keep_trainable_fp32(trainer.model)  # undo TRL's bf16 cast of LoRA weights on quantized models
    return trainer, watch


def train_steps(cfg: QLoraConfig, trainer, setup: Setup, watch: Watchers, run_dir: Path,
                resume_from: Optional[str], finished: bool) -> Dict[str, Any]:
    """The training loop, inside the CPU levers; where every step is done, the last checkpoint loaded
    instead. Returns what the levers did (report.json's fields). Ctrl-C, out of memory and a non-finite loss
    end here, each with what to do next."""
    import torch

    from qlora.dequant import fast_dequant
    from qlora.fused_lora import fused_lora
    from qlora.guards import NonFinite
    from qlora.neftune import embedding_noise
    from qlora.one_pass_head import head_one_pass
    from qlora.padding_free import segment_attention_for
    from qlora.speed import compiled_layers, head_tiles_in_place, small_head_tiles, trained_positions_only_on_cpu

    t, cpu = cfg.train, setup.device == "cpu"
    watch.stopper.install()
    compiled, dequant_kernel, attentions = 0, False, set()
    try:
        if finished:
            load_checkpoint(trainer, Path(resume_from))
            if watch.early:  # as transformers' load_best_model_at_end would have at the end of training
                load_best_adapter(trainer, run_dir)
            watch.checkpointed.layers = watch.checkpointed.count(trainer.model) if setup.checkpointing else 0
        else:
            with trained_positions_only_on_cpu(t.score_trained_only), \
                    compiled_layers(trainer.model, setup.compiling) as compiled, \
                    small_head_tiles(t.small_head_tiles and cpu), \
                    head_tiles_in_place(t.head_tiles_in_place and cpu), \
                    head_one_pass(t.head_one_pass and t.head_tiles_in_place and cpu, setup.bf16_base), \
                    fused_lora(setup.fused, setup.bf16_base), \
                    embedding_noise(trainer.model, t.neftune_noise_alpha), \
                    segment_attention_for(trainer.model, setup.one_row) as attentions, \
                    fast_dequant(t.fast_dequant and cpu and cfg.quant.load_in_4bit) as dequant_kernel:
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
        watch.stopper.uninstall()
    if watch.stopper.received:
        raise Interrupted(f"{watch.stopper.received} at step {trainer.state.global_step}: checkpoint saved in "
                          f"{latest_checkpoint(run_dir)}; continue with: {resume_command(run_dir)}")
    attention = ", ".join(sorted(attentions)) or trainer.model.config._attn_implementation
    return {"compiled_layers": compiled, "dequant_kernel": dequant_kernel,
            "padding_free_attention": attention if setup.one_row else None}


def finish(cfg: QLoraConfig, run_dir: Path, trainer, data: Data, setup: Setup, watch: Watchers,
           used: Dict[str, Any], before: Optional[List[Dict[str, Any]]], load_seconds: float) -> Dict[str, Any]:
    """After the last step: the adapter saved, the held-out loss and exact match (the answers, with the
    base's from `before`, in eval_answers.jsonl), report.json, loss.png and the closing lines. Returns the
    report."""
    import torch

    from qlora.evaluate import graded_answers, matched_share, mean_loss, write_answers
    from qlora.tracking import package_versions, peak_memory_gb, plot_losses, write_atomic

    t, logger, state = cfg.train, watch.logger, trainer.state
    early = watch.early
    stopped_early = bool(early and early.early_stopping_patience_counter >= t.early_stopping_patience)
    if early and state.best_model_checkpoint:
        say("train.early_stopping_patience: " + (
            f"no lower held-out loss in {t.early_stopping_patience} evaluation(s), so stopped at step "
            f"{state.global_step}; " if stopped_early else "")
            + f"the adapter is the best checkpoint's, {Path(state.best_model_checkpoint).name} "
              f"(held-out loss {state.best_metric:.4g})")
    save_adapter(trainer.model, data.tokenizer, run_dir / "adapter")  # first: whatever the evaluation meets
    # the same code as `qlora eval`: mean loss per trained token
    eval_loss = mean_loss(trainer.model, data.eval_rows, t.per_device_train_batch_size) if data.eval_rows else None
    graded = graded_answers(trainer.model, data.tokenizer, data.eval_ex, cfg.eval) if before is not None else None
    if graded:
        write_answers(run_dir / "eval_answers.jsonl", graded, before)
    em_before, em_after = (matched_share(before), matched_share(graded)) if graded else (None, None)

    losses = [r["loss"] for r in logger.records if isinstance(r.get("loss"), float)]
    tokens = max([r.get("tokens", 0) for r in logger.records] or [0])  # over the whole run, resumed or not
    if eval_loss is not None:
        logger.records.append({"step": state.global_step, "eval_loss": eval_loss})
    seconds = logger.train_seconds
    stats = data.stats
    report = dict(
        # seconds and speed of this process's training (after a resume, of the steps it trained)
        steps=state.global_step, train_tokens=int(tokens), train_seconds=round(seconds, 3),
        tokens_per_second=round(logger.session_tokens / seconds, 2) if seconds > 0 else None,
        load_seconds=round(load_seconds, 2), time_to_first_step_seconds=(
            None if logger.time_to_first_step is None else round(logger.time_to_first_step, 2)),
        peak_memory_gb=round(peak_memory_gb(setup.device), 3),
        device=torch.cuda.get_device_name(0) if setup.device == "cuda" else "cpu",
        compute_dtype=str(setup.dtype).replace("torch.", ""), gradient_checkpointing=setup.checkpointing,
        checkpointed_layers=watch.checkpointed.layers, liger_kernels=setup.liger, fused_lora=setup.fused,
        bf16_base_products=setup.bf16_base, compiled_layers=used["compiled_layers"],
        dequant_kernel=used["dequant_kernel"], padding_free_attention=used["padding_free_attention"],
        skipped_steps=watch.guard.skipped, loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        eval_loss=eval_loss, eval_exact_match=em_after, eval_exact_match_before=em_before,
        best_checkpoint=state.best_model_checkpoint, best_eval_loss=state.best_metric,
        stopped_early=stopped_early if early else None,
        train_examples=len(data.train_rows), eval_examples=len(data.eval_rows),
        data=dict(rows=stats.rows, dropped=dict(stats.dropped), truncated=stats.truncated,
                  trained_tokens_per_epoch=stats.trained_tokens),
        versions=package_versions(),
    )
    write_atomic(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    plot_losses(logger.records, run_dir / "loss.png")
    say(f"done in {time.perf_counter() - logger.started:.0f} s: {report['steps']} steps, "
        + (f"{report['tokens_per_second']:,.1f} tokens/s, " if report["tokens_per_second"] else "")
        + (f"loss {report['loss_first']:.4g} -> {report['loss_last']:.4g}" if losses else "no loss logged")
        + (f", held-out exact match {em_before:.1%} -> {em_after:.1%}" if em_after is not None else ""))
    if graded:
        say(f"the held-out answers beside their references, before and after: {run_dir / 'eval_answers.jsonl'}")
    say(f"talk to it: qlora chat adapter={shlex.quote(str(run_dir))}")
    print(run_dir)
    return report
