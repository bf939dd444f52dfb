"""The run directory of `qlora train`: where a run goes, what it resumes from, how to continue it,
and the adapter it leaves (the README's "The run directory" lists the files)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
from datetime import datetime
from pathlib import Path
from typing import Optional, Tuple

from qlora.checkpoints import latest_checkpoint
from qlora.config import QLoraConfig, Resume
from qlora.distributed import is_main, world_size
from qlora.errors import UserError


def default_output_dir(cfg: QLoraConfig, suffix: str = "") -> str:
    """outputs/<recipe>/<YYYYmmdd-HHMMSS><suffix>: where a run (or a sweep, suffix -sweep) goes unless told;
    a recipe file's name without .yaml stands for it (outputs/mine/... for recipe=path/to/mine.yaml)."""
    recipe = re.sub(r"\.ya?ml$", "", Path(cfg.recipe).name) if cfg.recipe else "demo"
    return f"outputs/{recipe}/{datetime.now():%Y%m%d-%H%M%S}{suffix}"


def prepare_run_dir(cfg: QLoraConfig) -> Tuple[Path, Optional[str]]:
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


def save_adapter(model, tokenizer, target: Path) -> None:
    """The adapter in PEFT's own format, with the tokenizer and chat template; written aside, then renamed."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
