"""`qlora train --multirun`: every combination of the swept values, validated first, run one by one,
compared in a table; one run's failure does not stop the others; resume=auto keeps finished runs."""
import json

import pytest

from qlora.cli import main
from qlora.sweep import expand, folder_name
from tests.conftest import tiny_overrides


def test_swept_values_expand_to_every_combination_in_order():
    runs, swept = expand(["lora.r=4,8", "train.max_steps=3", "train.learning_rate=range(1,3)",
                          "lora.target_modules=[q_proj,v_proj]", "prompt=Hi, there"])
    assert swept == ["lora.r", "train.learning_rate"]
    assert [r[:3] for r in runs] == [["lora.r=4", "train.max_steps=3", "train.learning_rate=1"],
                                     ["lora.r=4", "train.max_steps=3", "train.learning_rate=2"],
                                     ["lora.r=8", "train.max_steps=3", "train.learning_rate=1"],
                                     ["lora.r=8", "train.max_steps=3", "train.learning_rate=2"]]
    assert all(r[3:] == ["lora.target_modules=[q_proj,v_proj]", "prompt=Hi, there"] for r in runs)  # not sweeps
    assert folder_name(3, runs[2], swept) == "03_lora.r-8_train.learning_rate-1"


def test_a_bad_value_in_any_run_is_refused_before_the_first_starts(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = tiny_overrides(tiny_model, tiny_data, out, **{"lora.r": "4,abc"})
    assert main(["train", "--multirun", *args]) == 2
    assert "run 2 of 2 (lora.r=abc): lora.r: Value 'abc'" in capsys.readouterr().err
    assert not out.exists()


def test_a_sweep_under_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--multirun", "lora.r=4,8"]) == 2
    assert "--multirun under torchrun / accelerate launch" in capsys.readouterr().err


def test_several_values_without_multirun_say_how_to_sweep(capsys):
    assert main(["train", "lora.r=8,16"]) == 2
    assert "add --multirun (qlora train --multirun lora.r=8,16); for a list write lora.r=[8,16]" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_a_sweep_runs_each_combination_compares_them_and_resumes(tiny_model, tiny_data, tmp_path, capsys):
    """Two runs, the second diverging (a learning rate of 1e30): the first is trained and reported, the
    second fails on its own (exit 1 for the sweep), and resume=auto keeps the first as it was."""
    out = tmp_path / "sweep"
    args = tiny_overrides(tiny_model, tiny_data, out, **{"train.learning_rate": "5e-3,1e30",
                                                         "train.max_grad_norm": 1e30, "train.max_steps": 4})
    assert main(["train", "--multirun", *args]) == 1
    first, second = out / "01_train.learning_rate-0.005", out / "02_train.learning_rate-1e+30"
    assert (first / "report.json").is_file() and not (second / "report.json").exists()
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["swept"] == ["train.learning_rate"]
    done, failed = summary["runs"]
    assert done["status"] == "done" and done["values"] == ["train.learning_rate=0.005"]
    assert done["eval_loss"] == json.loads((first / "report.json").read_text())["eval_loss"]
    assert failed["status"] == "failed (exit 1)" and failed["eval_loss"] is None
    assert "| **0.005** | **done** |" in (out / "sweep.md").read_text() and (out / "sweep.png").is_file()
    assert "1 of 2 runs failed: 02_train.learning_rate-1e+30 (failed (exit 1))" in capsys.readouterr().err

    made = (first / "report.json").stat().st_mtime_ns
    from qlora import api
    from qlora.errors import WorkError

    with pytest.raises(WorkError, match="1 of 2 runs failed"):  # from Python, as `qlora train --multirun`
        api.sweep(*args, "resume=auto")
    assert "run 1 of 2 (train.learning_rate=0.005) is done; kept" in capsys.readouterr().err
    assert (first / "report.json").stat().st_mtime_ns == made


@pytest.mark.slow
def test_ctrl_c_stops_the_run_under_way_with_a_checkpoint_and_resume_finishes_the_sweep(tiny_model, tiny_data,
                                                                                      tmp_path):
    """SIGINT to the sweep's process alone (as a scheduler sends it): the run under way gets it once, saves
    a checkpoint and stops; the sweep says how to continue; resume=auto does."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    args = tiny_overrides(tiny_model, tiny_data, out, **{"lora.r": "4,8", "train.max_steps": 40,
                                                         "train.save_steps": 2})
    proc = subprocess.Popen([sys.executable, "-m", "qlora", "train", "--multirun", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "01_lora.r-4"
    deadline = time.time() + 240
    while not (first / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "sweep stopped at run 1 of 2" in err and "resume=auto" in err and "Traceback" not in err
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["status"] == "interrupted"
    assert not (out / "02_lora.r-8").exists()
    assert main(["train", "--multirun", *args, "resume=auto"]) == 0
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["done", "done"] and all(r["steps"] == 40 for r in runs)
