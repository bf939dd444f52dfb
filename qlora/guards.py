"""Training that stops well: on Ctrl-C / SIGTERM with a checkpoint, and on a non-finite loss or
gradient before the optimizer applies it."""
from __future__ import annotations

import math
import signal
from typing import Optional

from transformers import TrainerCallback


class NonFinite(Exception):
    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


class StopOnSignal(TrainerCallback):
    """SIGINT or SIGTERM: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received:  # asked twice: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kw):
        if self.received:
            control.should_save = True
            control.should_training_stop = True


class NonFiniteGuard(TrainerCallback):
    """Checks the gradients before every optimizer step and the loss at every log.

    policy stop: raise NonFinite (the last saved checkpoint is the last good state);
    policy skip: drop this step's gradients, so the optimizer leaves every weight as it was."""

    def __init__(self, policy: str, scaler_owns_overflow: bool = False):
        self.policy = policy
        self.skipped = 0
        # with fp16 AMP, inf gradients are the grad scaler's business: it skips the step and rescales
        self.check_gradients = not scaler_owns_overflow

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        import torch

        if not self.check_gradients:
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        # the largest |gradient| is finite exactly when all are: foreach kernels and one GPU sync a step,
        # not one per tensor (TinyLlama's LoRA has 308)
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf")))):
            return
        if self.policy == "stop":
            control.should_save = False
            raise NonFinite(state.global_step + 1, "gradient")
        self.skipped += 1
        for p in model.parameters():
            p.grad = None  # torch optimizers skip parameters without a gradient

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss) and self.policy == "stop":
            control.should_save = False
            raise NonFinite(state.global_step, "loss")
