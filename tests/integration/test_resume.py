"""Runs that survive kills, interrupted saves and NaNs, and resume to the same result."""
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.checkpoints import latest_checkpoint, step_of
from qlora.cli import main
from tests.conftest import tiny_overrides

STEPS, SAVE = 16, 2


def overrides(tiny_model, tiny_data, out, **extra):
    return tiny_overrides(tiny_model, tiny_data, out, **{"train.max_steps": STEPS, "train.save_steps": SAVE,
                                                         "train.save_total_limit": 3, **extra})


def adapter_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "adapter" / "adapter_model.safetensors")), \
        load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *overrides(tiny_model, tiny_data, out)]) == 0
    return out


def start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "qlora", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_checkpoint(run: Path, step: int, proc, timeout=240):
    marker = run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


@pytest.mark.parametrize("attempt", [0, 1])
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(uninterrupted, tiny_model, tiny_data,
                                                                   tmp_path, attempt):
    out = tmp_path / "run"
    # mostly while training; after the last checkpoints, sometimes in the wrap-up (tested on its own below)
    after = random.Random().choice(range(SAVE, STEPS, SAVE))
    proc = start(overrides(tiny_model, tiny_data, out))
    wait_for_checkpoint(out, after, proc)
    time.sleep(random.Random().uniform(0, 0.3))  # somewhere in the steps after that checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert main(["train", *overrides(tiny_model, tiny_data, out, resume="auto")]) == 0
    diff = adapter_diff(out, uninterrupted)
    print(f"SIGKILL after checkpoint-{killed_at}: max |adapter difference| = {diff}")
    assert diff == 0.0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"each step logged once: {steps}"
    report, straight = (json.loads((run / "report.json").read_text()) for run in (out, uninterrupted))
    for key in ("steps", "train_tokens", "loss_first", "loss_last"):  # the whole run's, not the resumed part's
        assert report[key] == straight[key], key


def test_sigint_saves_a_checkpoint_says_how_to_resume_and_resumes_exactly(uninterrupted, tiny_model, tiny_data,
                                                                         tmp_path):
    out = tmp_path / "run"
    proc = start(overrides(tiny_model, tiny_data, out))
    wait_for_checkpoint(out, SAVE, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT at step" in err and "resume=auto" in err and "Traceback" not in err
    stopped = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert (out / "checkpoints" / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    assert main(["train", *overrides(tiny_model, tiny_data, out, resume="auto")]) == 0
    diff = adapter_diff(out, uninterrupted)
    print(f"SIGINT at step {stopped}: max |adapter difference| = {diff}")
    assert diff == 0.0


def test_a_kill_during_the_wrap_up_resumes_to_the_same_result_without_another_step(uninterrupted, tiny_model,
                                                                                  tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    # what a kill after the final checkpoint leaves: every step trained and logged, nothing written after
    for name in ("adapter", "report.json", "loss.png"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main(["train", *overrides(tiny_model, tiny_data, out, resume="auto")]) == 0
    assert adapter_diff(out, uninterrupted) == 0.0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"no step past train.max_steps: {steps}"
    report, straight = (json.loads((run / "report.json").read_text()) for run in (out, uninterrupted))
    for key in ("steps", "train_tokens", "loss_first", "loss_last", "eval_loss"):
        assert report[key] == straight[key], key
    assert (out / "loss.png").is_file()


def test_a_checkpoint_cut_short_during_its_save_is_skipped(uninterrupted, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = start(overrides(tiny_model, tiny_data, out))
    wait_for_checkpoint(out, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # fault injection: a copy of the newest whole checkpoint, as a kill in the middle of its save leaves
    # it, numbered past every checkpoint there (the kill itself may have cut the next one's save short)
    newest = latest_checkpoint(out)
    last = max(step_of(c) for c in (out / "checkpoints").glob("checkpoint-*"))
    broken = newest.with_name(f"checkpoint-{last + SAVE}")
    shutil.copytree(newest, broken)
    (broken / "trainer_state.json").write_text('{"global_step": ')
    with open(broken / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    assert main(["train", *overrides(tiny_model, tiny_data, out, resume="auto")]) == 0
    assert adapter_diff(out, uninterrupted) == 0.0


def test_resume_auto_starts_a_run_that_has_no_checkpoint_yet(uninterrupted, tiny_model, tiny_data, tmp_path, capsys):
    """One command for every launch (a Colab session that dies, a preempted job): resume=auto starts the
    run in a new folder, and again in one whose last start ended before its first checkpoint."""
    fresh = tmp_path / "fresh"
    assert main(["train", *overrides(tiny_model, tiny_data, fresh, resume="auto")]) == 0
    assert "resume=auto: no checkpoint in" in capsys.readouterr().err
    assert adapter_diff(fresh, uninterrupted) == 0.0
    cut = tmp_path / "cut"  # what a start killed before its first checkpoint leaves
    cut.mkdir()
    (cut / "fingerprint.json").write_text("{}")
    (cut / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    assert main(["train", *overrides(tiny_model, tiny_data, cut, resume="auto")]) == 0
    assert "starting the run again" in capsys.readouterr().err
    assert adapter_diff(cut, uninterrupted) == 0.0
    assert '"step": 99' not in (cut / "metrics.jsonl").read_text()
    shutil.rmtree(cut / "checkpoints")  # a finished run without checkpoints is not started over
    assert main(["train", *overrides(tiny_model, tiny_data, cut, resume="auto")]) == 2
    assert "the folder holds something else" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused_with_what_differs(uninterrupted, tiny_model, tiny_data, capsys):
    assert main(["train", *overrides(tiny_model, tiny_data, uninterrupted, resume="auto",
                                     **{"lora.r": 4, "train.seed": 1})]) == 2
    err = capsys.readouterr().err
    assert "lora.r: the run had 8, now 4" in err and "train.seed: the run had 0, now 1" in err


def test_nan_stops_the_run_names_the_step_and_keeps_a_good_checkpoint(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *tiny_overrides(tiny_model, tiny_data, out, **{
        "train.max_steps": 30, "train.save_steps": 1, "train.learning_rate": 1e30, "train.max_grad_norm": 1e30,
        "train.warmup_ratio": 0, "train.lr_scheduler_type": "constant"})])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "non-finite" in err and "at step" in err and "lower train.learning_rate" in err
    good = err.split("Last good checkpoint: ")[1].split()[0]
    weights = load_file(str(Path(good) / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_policy_skip_trains_on_without_applying_bad_steps(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    code = main(["train", *tiny_overrides(tiny_model, tiny_data, out, **{
        "train.max_steps": 20, "train.learning_rate": 1e30, "train.max_grad_norm": 1e30,
        "train.warmup_ratio": 0, "train.lr_scheduler_type": "constant", "train.nan_policy": "skip"})])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_steps"] > 0


def test_a_run_made_before_a_lora_key_existed_still_resumes(tiny_model, tiny_data, tmp_path, capsys):
    """fingerprint.json of a run made before lora.use_rslora: the key is taken at the value such runs had."""
    from qlora.checkpoints import check_resumable, fingerprint
    from qlora.cli import compose
    from qlora.errors import UserError

    cfg = compose("train", overrides(tiny_model, tiny_data, tmp_path))
    old = {k: v for k, v in fingerprint(cfg).items() if k != "lora.use_rslora"}
    (tmp_path / "fingerprint.json").write_text(json.dumps(old))
    check_resumable(tmp_path, cfg)
    with pytest.raises(UserError, match="lora.use_rslora: the run had False, now True"):
        check_resumable(tmp_path, compose("train", overrides(tiny_model, tiny_data, tmp_path, **{"lora.use_rslora": "true"})))


def test_a_run_made_before_experts_in_4bit_resumes_and_loads_with_its_experts_in_full(tiny_model, tiny_data,
                                                                                    tmp_path):
    """A run made before quant.experts_in_4bit trained a mixture's experts in full: resuming it asks for
    the key at that value, and its adapter is loaded with them in full (generate, eval, merge)."""
    from qlora.checkpoints import check_resumable, fingerprint
    from qlora.cli import compose
    from qlora.errors import UserError
    from qlora.inference import run_config

    cfg = compose("train", overrides(tiny_model, tiny_data, tmp_path))
    old = {k: v for k, v in fingerprint(cfg).items() if k != "quant.experts_in_4bit"}
    (tmp_path / "fingerprint.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="quant.experts_in_4bit: the run had False, now True"):
        check_resumable(tmp_path, cfg)
    check_resumable(tmp_path, compose("train", overrides(tiny_model, tiny_data, tmp_path,
                                                         **{"quant.experts_in_4bit": "false"})))
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("quant:\n  load_in_4bit: true\n")
    assert run_config(run / "adapter").quant.experts_in_4bit is False
    (run / "config.yaml").write_text("quant:\n  load_in_4bit: true\n  experts_in_4bit: true\n")
    assert run_config(run / "adapter").quant.experts_in_4bit is True


EARLY = {"train.max_steps": 40, "train.eval_steps": 1, "train.save_steps": 1, "train.save_total_limit": 40,
         "train.early_stopping_patience": 2, "train.learning_rate": 0.05}


@pytest.fixture(scope="module")
def stopped_early(tiny_model, tiny_data, tmp_path_factory):
    """A run that stops early: (run directory, its report, its adapter's weights, its held-out losses by step)."""
    out = tmp_path_factory.mktemp("early") / "run"
    assert main(["train", *overrides(tiny_model, tiny_data, out, **EARLY)]) == 0
    report = json.loads((out / "report.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r and "loss" not in r}
    return out, report, load_file(str(out / "adapter" / "adapter_model.safetensors")), evals


def test_early_stopping_ends_the_run_with_the_best_checkpoints_adapter(stopped_early):
    out, report, adapter, evals = stopped_early
    steps = report["steps"]
    assert report["stopped_early"] is True and steps < EARLY["train.max_steps"]
    best = min(evals[s] for s in evals if s <= steps - 1)  # the step-by-step held-out losses, the last eval aside
    best_step = next(s for s in sorted(evals) if evals[s] == best)
    assert best_step == steps - EARLY["train.early_stopping_patience"]  # then 2 evaluations without a lower loss
    assert all(evals[s] >= best for s in range(best_step + 1, steps + 1))
    assert report["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    saved = load_file(str(out / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    assert all(torch.equal(adapter[k], saved[k]) for k in adapter)
    last = load_file(str(out / "checkpoints" / f"checkpoint-{steps}" / "adapter_model.safetensors"))
    assert any(not torch.equal(adapter[k], last[k]) for k in adapter)


@pytest.mark.parametrize("back", [1, 0])
def test_an_early_stopped_run_killed_before_its_end_resumes_to_the_same_end(stopped_early, tiny_model, tiny_data,
                                                                          tmp_path, back):
    """Cut back to the checkpoint `back` steps before the stop (one evaluation without a lower loss counted, so
    the count must come back from the checkpoint), or to the stop's own (only the wrap-up is left)."""
    out, report, adapter, _ = stopped_early
    run = tmp_path / "run"
    shutil.copytree(out, run)
    cut = report["steps"] - back
    for name in ("report.json", "loss.png", "adapter"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    for ckpt in (run / "checkpoints").glob("checkpoint-*"):
        if step_of(ckpt) > cut:
            shutil.rmtree(ckpt)
    assert main(["train", *overrides(tiny_model, tiny_data, run, resume="auto", **EARLY)]) == 0
    again = json.loads((run / "report.json").read_text())
    assert again["steps"] == report["steps"] and again["stopped_early"] is True
    assert again["best_checkpoint"].endswith(Path(report["best_checkpoint"]).name)
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(adapter[k], resumed[k]) for k in adapter)
