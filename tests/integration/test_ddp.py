"""Two processes under torchrun (gloo on CPU) train like one process with the same global batch, only
rank 0 writes, and the train verb tears down the process group when it is done."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from qlora.cli import main
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_model, tiny_data, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = {"train.max_steps": 6, "train.save_steps": 3, "train.report_to": "[tensorboard]"}
    assert main(["train", *tiny_overrides(tiny_model, tiny_data, single, **common,
                                          **{"train.per_device_train_batch_size": 4})]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qlora",
                           "train", *tiny_overrides(tiny_model, tiny_data, ddp, **common,
                                                    **{"train.per_device_train_batch_size": 2})],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    print(f"DDP x2 vs single process: max |adapter difference| {diff:.2e} (largest weight {scale:.2e})")
    assert diff < 1e-3 * max(scale, 1.0)
    steps = [json.loads(line)["step"] for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], "one rank logs"
    assert len(list((ddp / "tensorboard").rglob("events.out.tfevents*"))) == 1
    assert done.stdout.count(str(ddp)) == 1 and done.stderr.count("[qlora] training") == 1
    single_report = json.loads((single / "report.json").read_text())
    ddp_report = json.loads((ddp / "report.json").read_text())
    assert ddp_report["train_tokens"] == pytest.approx(single_report["train_tokens"], rel=0.01)


def test_the_train_verb_tears_down_the_process_group_it_trained_under(tiny_model, tiny_data, tmp_path):
    # left to interpreter exit, gloo's threads can abort a rank whose run succeeded (pytorch#190489)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert main(["train", *tiny_overrides(tiny_model, tiny_data, tmp_path / "run", **{"train.max_steps": 1})]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
