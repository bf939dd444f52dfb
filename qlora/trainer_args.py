"""TRL's SFTConfig (transformers' TrainingArguments) from our config keys, with the flags each device needs."""
from __future__ import annotations

from pathlib import Path

from qlora.config import DistStrategy, QLoraConfig


def trainer_args(cfg: QLoraConfig, run_dir: Path, device: str, dtype, checkpointing: bool, optim: str,
                 liger: bool, has_eval: bool):
    """The SFTConfig of a run: checkpoints under run_dir/checkpoints, evaluation when there is held-out data."""
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
