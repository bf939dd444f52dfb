"""`qlora train --multirun key=a,b ...`: one run per combination of the swept values, one after another,
then a table and a plot that compare them.

Values are swept as Hydra's basic sweeper sweeps them (`lora.r=8,16`, `train.learning_rate=range(1,4)`,
`choice(...)`; every combination, in the order given). Every combination is composed and validated
before the first run starts. Each run is a `qlora train` process of its own in a folder of the sweep
folder (`output_dir`, by default outputs/<recipe>/<time>-sweep), so that one run's failure or memory
does not reach the next. `resume=auto` continues a sweep: finished runs are kept, the others resumed.
"""
from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from qlora.cli import FREE_TEXT, compose
from qlora.errors import Interrupted, UserError, WorkError
from qlora.models import say
from qlora.run_dir import default_output_dir

COLUMNS = ("steps", "loss_last", "eval_loss", "eval_exact_match", "tokens_per_second", "peak_memory_gb")


def expand(args: List[str]) -> Tuple[List[List[str]], List[str]]:
    """(each run's arguments, the swept keys): the cartesian product of the swept values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, choices, swept = OverridesParser.create(), [], []
    for arg in args:
        key = arg.partition("=")[0]
        try:
            override = None if key in FREE_TEXT else parser.parse_overrides([arg])[0]
            values = list(override.sweep_string_iterator()) if override and override.is_sweep_override() else None
        except HydraException as e:
            raise UserError(f"{arg}: {str(e).splitlines()[0]} (sweep with a,b,c, range(start,stop) or "
                            "choice(a,b))") from None
        choices.append([f"{key}={v}" for v in values] if values else [arg])
        if values:
            swept.append(key)
    return [list(run) for run in itertools.product(*choices)], swept


def swept_values(run: List[str], swept: List[str]) -> List[str]:
    """The run's key=value arguments of the swept keys."""
    return [a for a in run if a.partition("=")[0] in swept]


def folder_name(index: int, run: List[str], swept: List[str]) -> str:
    """`01_lora.r-8_train.learning_rate-0.0001`: the run's number and swept values, safe as a folder name
    (and as a value on Hydra's command line)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", "_".join([f"{index:02d}", *swept_values(run, swept)]))[:120]


def sweep(args: List[str]) -> int:
    """The `qlora train --multirun` verb."""
    print(run_sweep(args))
    return 0


def run_sweep(args: List[str]) -> Path:
    """Every run of the sweep these arguments give, one after another; returns the sweep folder."""
    from qlora.distributed import world_size
    from qlora.validation import refuse, validate_train

    if world_size() > 1:  # each rank would start the whole sweep, its runs without the launcher's processes
        raise UserError("--multirun under torchrun / accelerate launch: start the sweep with plain `qlora train "
                        "--multirun`; its runs are one process each")

    runs, swept = expand(args)
    if not swept:
        raise UserError("--multirun: nothing to sweep; give a key several values, e.g. lora.r=8,16")
    base = compose("train", [a for a in args if a.partition("=")[0] not in swept])
    top = Path(base.output_dir or default_output_dir(base, "-sweep"))
    top = top.expanduser().resolve()
    resume = base.resume == "auto"
    if top.exists() and any(top.iterdir()) and not (resume or base.overwrite):
        raise UserError(f"output_dir={top} exists and is not empty; pass resume=auto to continue that sweep, "
                        "overwrite=true to replace its runs, or another output_dir")
    plan = []
    for i, run in enumerate(runs, 1):
        folder = top / folder_name(i, run, swept)
        run = [a for a in run if a.partition("=")[0] != "output_dir"] + [f"output_dir={folder}"]
        try:
            cfg = compose("train", run)
            refuse(validate_train(cfg))
        except UserError as e:
            raise UserError(f"run {i} of {len(runs)} ({' '.join(swept_values(run, swept))}): {e}") from None
        plan.append((folder, run, resume and finished_with(folder, cfg)))
    say(f"sweep: {len(plan)} runs of {', '.join(swept)} in {top}")
    rows: List[Dict[str, Any]] = []
    interrupted = False
    for i, (folder, run, done) in enumerate(plan, 1):
        values = swept_values(run, swept)
        if done:
            say(f"sweep: run {i} of {len(plan)} ({' '.join(values)}) is done; kept")
            code = 0
        else:
            say(f"sweep: run {i} of {len(plan)}: {' '.join(values)} -> {folder}")
            code, interrupted = run_train(run)
        rows.append(summary_row(folder, values, code))
        write_summary(top, rows, swept)
        if interrupted or code == 130:
            raise Interrupted(f"sweep stopped at run {i} of {len(plan)}; continue it with the same command and "
                              f"resume=auto output_dir={top}")
    print(table(rows, swept), file=sys.stderr)
    say(f"sweep: table in {top / 'sweep.md'}, plot in {top / 'sweep.png'}")
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        raise WorkError(f"{len(failed)} of {len(rows)} runs failed: "
                        + "; ".join(f"{r['run']} ({r['status']})" for r in failed))
    return top


def run_train(args: List[str]) -> Tuple[int, bool]:
    """`qlora train ARGS` in a process of its own: (its exit code, whether it was told to stop). It runs in
    a session of its own, so that Ctrl-C or SIGTERM reaches it once, from here: it saves a checkpoint and
    stops (a second Ctrl-C stops it at once, as it does a single run)."""
    proc = subprocess.Popen([sys.executable, "-m", "qlora", "train", *args], start_new_session=True)
    told: List[int] = []

    def forward(signum, frame):
        told.append(signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait(), bool(told)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def finished_with(folder: Path, cfg) -> bool:
    """Whether the run in this folder finished (report.json) with these settings (its config.yaml); else
    resume=auto hands it to `qlora train resume=auto`, which continues or extends it."""
    from omegaconf import OmegaConf

    if not (folder / "report.json").is_file() or not (folder / "config.yaml").is_file():
        return False
    ignored = ("resume", "overwrite")
    saved = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    now = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    return {k: v for k, v in saved.items() if k not in ignored} == {k: v for k, v in now.items() if k not in ignored}


def summary_row(folder: Path, values: List[str], code: int) -> Dict[str, Any]:
    """One run's line of the sweep's table: its swept values, how it ended, and its report's numbers."""
    report = json.loads((folder / "report.json").read_text()) if code == 0 and (folder / "report.json").is_file() else {}
    status = "done" if report else "interrupted" if code == 130 else f"failed (exit {code})"
    return {"run": folder.name, "values": values, "status": status, **{k: report.get(k) for k in COLUMNS}}


def table(rows: List[Dict[str, Any]], swept: List[str]) -> str:
    """The runs as a Markdown table, the one with the lowest held-out loss (else last training loss) in bold."""
    score = "eval_loss" if any(r["eval_loss"] is not None for r in rows) else "loss_last"
    scored = [r for r in rows if r[score] is not None]
    best = min(scored, key=lambda r: r[score])["run"] if scored else None
    lines = ["| " + " | ".join([*swept, "status", *COLUMNS]) + " |", "|" + "---|" * (len(swept) + 1 + len(COLUMNS))]
    for r in rows:
        cells = [v.partition("=")[2] for v in r["values"]] + [r["status"]] + [fmt(r[k]) for k in COLUMNS]
        if r["run"] == best:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def write_summary(top: Path, rows: List[Dict[str, Any]], swept: List[str]) -> None:
    """sweep.json, sweep.md and sweep.png (each run's training loss by step, held-out loss as dots)."""
    from qlora.tracking import write_atomic

    top.mkdir(parents=True, exist_ok=True)
    write_atomic(top / "sweep.json", json.dumps({"swept": swept, "runs": rows}, indent=2) + "\n")
    write_atomic(top / "sweep.md", table(rows, swept))
    plot_runs(top, rows)


def plot_runs(top: Path, rows: List[Dict[str, Any]]) -> None:
    """sweep.png: each run's training loss by step (a line) and held-out loss (dots), in one color."""
    from qlora.tracking import loss_points, new_figure, save_figure

    fig, ax = new_figure((8, 4.5))
    for i, r in enumerate(rows):
        path = top / r["run"] / "metrics.jsonl"
        train, evals = loss_points([json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                                   if path.is_file() else [])
        if r["eval_loss"] is not None:  # the end of the run's, in its report
            evals.append((r["steps"], r["eval_loss"]))
        color = f"C{i % 10}"
        if train:
            ax.plot(*zip(*train), ".-", color=color, label=" ".join(r["values"]))
        if evals:
            ax.plot(*zip(*evals), "o", color=color)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (lines: training; dots: held-out)")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    save_figure(fig, top / "sweep.png")
