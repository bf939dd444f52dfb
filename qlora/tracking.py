"""What a run leaves for people to read: metrics.jsonl, report.json, loss.png; written atomically."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


def write_atomic(path: Path, text: str) -> None:
    """Write aside, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunLogger(TrainerCallback):
    """Appends one JSON object per log step to metrics.jsonl and times the training loop."""

    def __init__(self, run_dir: Path, started: float):
        self.path = run_dir / "metrics.jsonl"
        self.started = started  # when the verb started: time to first step counts from there
        # a resumed run goes on from the steps logged before it (those up to its checkpoint)
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        self.records: List[Dict[str, Any]] = [json.loads(line) for line in lines if line.strip()]
        self.loop_start = self.loop_end = self.first_step_end = None
        self.tokens_at_start = self.tokens_at_end = 0

    def on_train_begin(self, args, state, control, **kw):
        self.loop_start = time.perf_counter()
        self.tokens_at_start = self.tokens_at_end = state.num_input_tokens_seen  # restored on resume

    def on_step_end(self, args, state, control, **kw):
        if self.first_step_end is None:
            self.first_step_end = time.perf_counter()
        if state.global_step >= state.max_steps:  # the last steps' loss too, between logging_steps
            control.should_log = True

    def on_train_end(self, args, state, control, **kw):
        self.loop_end = time.perf_counter()
        self.tokens_at_end = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or not state.is_world_process_zero:
            return
        rec: Dict[str, Any] = {"step": state.global_step}
        if self.loop_start is not None:  # seconds into the training loop, for rates over any span of steps
            rec["seconds"] = round(time.perf_counter() - self.loop_start, 3)
        for key, value in logs.items():
            # tokens: transformers' count, kept in checkpoints (TRL's num_tokens restarts from 0 on resume)
            name = {"num_input_tokens_seen": "tokens"}.get(key, key)
            if isinstance(value, (int, float)) and not key.startswith("train_") and key != "num_tokens":
                rec[name] = value if math.isfinite(value) else str(value)
        if set(rec) - {"step", "seconds", "epoch", "total_flos", "tokens"}:  # not the end-of-training summary
            self.records.append(rec)
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    @property
    def train_seconds(self) -> float:
        """Seconds of this process's training loop (0 if it trained nothing)."""
        return (self.loop_end or time.perf_counter()) - (self.loop_start or time.perf_counter())

    @property
    def session_tokens(self) -> int:
        """Tokens trained through by this process (a resumed run's earlier ones are not counted)."""
        return self.tokens_at_end - self.tokens_at_start

    @property
    def time_to_first_step(self) -> Optional[float]:
        return None if self.first_step_end is None else self.first_step_end - self.started


class ProgressLines(ProgressCallback):
    """transformers' progress bar, with each log step written above it as one line people read
    (step, loss, gradient norm, learning rate, token accuracy, tokens/s) rather than a dict."""

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = progress_line(state.global_step, state.max_steps, logs)
            if line:
                self.training_bar.write(line)


def readable_progress(trainer) -> None:
    """Swaps transformers' progress bar for ProgressLines (in a notebook, its own progress table stays)."""
    if trainer.pop_callback(ProgressCallback):
        trainer.add_callback(ProgressLines())


def progress_line(step: int, max_steps: int, logs: Dict[str, Any]) -> Optional[str]:
    """One log step as a line; None for transformers' end-of-training summary (train.py prints its own)."""
    def shown(key: str, template: str, scale: float = 1.0) -> List[str]:
        value = logs.get(key)
        return [template.format(value * scale)] if isinstance(value, (int, float)) else []

    if "loss" in logs:
        parts = (shown("loss", "loss {:.4f}") + shown("grad_norm", "grad norm {:.3g}") + shown("learning_rate", "lr {:.2e}")
                 + shown("mean_token_accuracy", "token accuracy {:.1f}%", 100)
                 + shown("train_tokens_per_second", "{:,.0f} tokens/s"))
    elif "eval_loss" in logs:
        parts = shown("eval_loss", "held-out loss {:.4f}") + shown("eval_mean_token_accuracy", "token accuracy {:.1f}%", 100)
    else:
        return None
    return f"step {step}/{max_steps}  " + "  ".join(parts)


def schedule_line(t, steps: int, rows: int, what: str) -> str:
    """How many steps of how many rows, and what share of the data that is: a 10-hour run shows as one
    before it starts."""
    from qlora.distributed import world_size

    ranks = world_size()
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * ranks
    return (f"{steps} optimizer steps of {per_step} {what} ({t.per_device_train_batch_size} a micro-batch"
            + (f" x {t.gradient_accumulation_steps} accumulated" if t.gradient_accumulation_steps > 1 else "")
            + (f" x {ranks} processes" if ranks > 1 else "") + f"): {steps * per_step / max(rows, 1):.2f} "
            f"epoch(s) of {rows}")


def peak_memory_gb(device: str) -> float:
    """CUDA peak allocation on GPU, this process's peak RSS on CPU (GiB).

    On Linux the peak is the kernel's high-water mark of this process's own memory (VmHWM), not
    getrusage's ru_maxrss, which keeps the largest RSS of the process since before it ran Python: that
    of the program that launched it (a notebook's kernel, pytest, a bench driver holding a model), when
    larger. A `qlora train` launched by a process of 1.9 GiB reported 1.9 GiB where it had peaked at 1.4."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def package_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("qlora", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def loss_points(records: List[Dict[str, Any]]):
    """(training, held-out): the (step, loss) pairs of a run's metrics records."""
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), float)]
    return train, evals


def new_figure(size):
    """A matplotlib figure and axes, drawn off screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=100)


def save_figure(fig, path: Path) -> None:
    """Writes the figure as PNG aside, then renames it into place, and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(records: List[Dict[str, Any]], path: Path) -> None:
    """loss.png: training loss by step, with held-out loss where it was measured."""
    train, evals = loss_points(records)
    fig, ax = new_figure((7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
