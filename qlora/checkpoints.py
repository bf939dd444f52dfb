"""Resuming a run: which checkpoint is whole, and whether it belongs to the same experiment.

Checkpoints are written by transformers' Trainer in the order weights, optimizer, scheduler, RNG
states and, last, trainer_state.json; a checkpoint whose trainer_state.json is missing or cut short
was interrupted while saving and is skipped, so a kill during a save costs only that checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from qlora.config import QLoraConfig
from qlora.errors import UserError


def step_of(path: Path) -> int:
    tail = path.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def is_complete(checkpoint: Path) -> bool:
    """All files present and trainer_state.json (written last) readable."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest whole checkpoint of a run, or None."""
    found = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=step_of)
    whole = [c for c in found if is_complete(c)]
    return whole[-1] if whole else None


def data_digest(path: str, subset: Optional[str] = None, split: str = "train") -> str:
    """sha256 (16 hex digits) of the data a path names: the bytes of its files in order (a file, a
    folder, a glob), or for a Hugging Face dataset its name, subset and split (not its rows)."""
    from qlora.sources import is_local, local_files

    h = hashlib.sha256()
    if not is_local(path):
        h.update(f"{path}\0{subset}\0{split}".encode())
        return h.hexdigest()[:16]
    for file in local_files(path):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# keys the config gained after runs were made, with the value those runs had (for their fingerprint.json,
# and their config.yaml as inference.run_config reads it)
# (quant.experts_in_4bit: such runs trained a mixture's experts in full; a dense model's are unaffected by
# the key, but told to pass it all the same, as the fingerprint does not know the model's layers)
ADDED_KEYS: Dict[str, Any] = {"lora.use_rslora": False, "lora.init": "default", "quant.experts_in_4bit": False}


def fingerprint(cfg: QLoraConfig) -> Dict[str, Any]:
    """What must not change between a run and its resumption: model, quantization, LoRA, data, order."""
    from dataclasses import asdict
    from enum import Enum

    def plain(x):
        return {k: plain(v) for k, v in x.items()} if isinstance(x, dict) else (
            x.value if isinstance(x, Enum) else x)

    t, d = cfg.train, cfg.data
    return {
        "model.name_or_path": cfg.model.name_or_path,
        **{f"quant.{k}": v for k, v in plain(asdict(cfg.quant)).items()},
        **{f"lora.{k}": v for k, v in plain(asdict(cfg.lora)).items()},
        "data.path (sha256)": None if d.sources else data_digest(d.path, d.subset, d.split),
        **({"data.sources (sha256, weight, format)": [[data_digest(src.path, src.subset, src.split), src.weight,
                                                       src.format.value] for src in d.sources]} if d.sources else {}),
        "data.eval_path (sha256)": data_digest(d.eval_path, d.subset, d.eval_split) if d.eval_path else None,
        "data.format": d.format.value, "data.loss_on": d.loss_on.value, "data.eval_fraction": d.eval_fraction,
        "train.max_length": t.max_length, "train.seed": t.seed,
        "train.per_device_train_batch_size": t.per_device_train_batch_size,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
    }


def check_resumable(run_dir: Path, cfg: QLoraConfig) -> None:
    """Refuse to resume a run with another model, quantization, LoRA or data; say what differs."""
    saved_path = run_dir / "fingerprint.json"
    if not saved_path.is_file():
        raise UserError(f"resume: {run_dir} has no fingerprint.json, so it is not a qlora run (or predates it)")
    saved, now = {**ADDED_KEYS, **json.loads(saved_path.read_text())}, fingerprint(cfg)
    diffs: List[str] = [f"{k}: the run had {saved.get(k)!r}, now {v!r}" for k, v in now.items()
                        if saved.get(k) != v]
    if diffs:
        raise UserError("resume: this config is not the run's, so resuming would not continue the same "
                        "training:\n  " + "\n  ".join(diffs) + "\n  pass the run's settings (see its config.yaml) "
                        "or start a new run in another output_dir")


def load_checkpoint(trainer, checkpoint: Path) -> None:
    """The checkpoint's adapter and trainer state, put into a trainer without training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def early_stopping_count(checkpoint: Path) -> int:
    """Evaluations in a row without a lower held-out loss as of this checkpoint (train.early_stopping_patience):
    transformers' EarlyStoppingCallback keeps its count in the checkpoint's trainer_state.json."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback") or {}
    saved = saved[0] if isinstance(saved, list) and saved else saved
    return int((saved or {}).get("attributes", {}).get("early_stopping_patience_counter", 0))


def load_best_adapter(trainer, run_dir: Path) -> None:
    """The adapter of the checkpoint with the lowest held-out loss, put into the trainer's model (what
    transformers' load_best_model_at_end does at the end of training); found in this run directory."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    best = trainer.state.best_model_checkpoint
    if best:
        weights = run_dir / "checkpoints" / Path(best).name / "adapter_model.safetensors"
        set_peft_model_state_dict(trainer.model, load_file(str(weights)))


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Forget log lines of steps after the checkpoint: they are trained again."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    from qlora.tracking import write_atomic

    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))
