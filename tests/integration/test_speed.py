"""Every speed lever leaves training where it was: same losses and adapter with it on and off."""
import importlib.util
import json
import shutil

import pytest
from safetensors.torch import load_file

from qlora.cli import compose
from qlora.errors import UserError
from qlora.speed import decoder_layers, liger_wanted
from qlora.train import fit
from tests.conftest import tiny_overrides


def losses(run):
    lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


@pytest.mark.parametrize("lever", ["train.score_trained_only", "train.small_head_tiles",
                                   pytest.param("train.compile", marks=pytest.mark.slow)])
def test_lever_on_and_off_train_the_same(tiny_model, tiny_data, tmp_path, lever, monkeypatch):
    # the tiny model's ~400-word vocabulary and 4 x 128 batches fit in one real tile: split them here
    monkeypatch.setattr("qlora.speed.CPU_HEAD_TILE", (96, 64))
    runs = {}
    for on in (True, False):
        cfg = compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / f"{on}", **{lever: str(on).lower()}))
        runs[on] = fit(cfg)
    if lever == "train.compile":  # both decoder layers were compiled, and are eager again after training
        assert (runs[True].report["compiled_layers"], runs[False].report["compiled_layers"]) == (2, 0)
        layers = decoder_layers(runs[True].trainer.model)
        assert len(layers) == 2 and not any("forward" in vars(m) for m in layers)
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), abs=1e-5)
    a = load_file(str(runs[True].run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs[False].run_dir / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_where_torch_compile_cannot_build_auto_trains_eager_and_true_stops(tiny_model, tiny_data, tmp_path,
                                                                          monkeypatch, capsys):
    import torch

    from qlora.cli import main

    def no_toolchain(*args, **kwargs):
        raise RuntimeError("C++ compile error: cannot find Python.h\n(the rest of the compiler's output)")

    monkeypatch.setattr(torch, "compile", no_toolchain)
    monkeypatch.setattr("qlora.speed.COMPILE_MIN_STEPS", 1)  # so that auto would compile this short run
    assert main(["train", *tiny_overrides(tiny_model, tiny_data, tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert "torch.compile cannot build kernels here (RuntimeError: C++ compile error: cannot find Python.h)" in err
    assert "training without it" in err
    assert json.loads((tmp_path / "auto" / "report.json").read_text())["compiled_layers"] == 0
    assert main(["train", *tiny_overrides(tiny_model, tiny_data, tmp_path / "true", **{"train.compile": "true"})]) == 2
    err = capsys.readouterr().err
    assert "train.compile=true" in err and "set train.compile=false" in err and "Traceback" not in err
    assert not (tmp_path / "true" / "report.json").exists()


class AttentionCalls:
    """Counts the attention kernel's runs (a dispatch mode: SAC's cached outputs never reach it)."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter, self.count = self, 0
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += func is kernel
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.fixture(scope="module")
def fully_checkpointed(tiny_model, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "full"
    with AttentionCalls() as calls:
        run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, out, **{"train.gradient_checkpointing": "true"})))
    return run, calls.count


@pytest.mark.parametrize("lever, checkpointed, recomputed", [
    ({"train.checkpoint_layers": 1}, [True, False], 1),  # the first layer alone
    ({"train.checkpoint_attention": "true"}, [True, True], 0),  # both layers checkpointed, attention kept
    ({"train.gradient_checkpointing": "false"}, [False, False], 0),
])
def test_checkpointing_levers_train_as_full_checkpointing(fully_checkpointed, tiny_model, tiny_data, tmp_path,
                                                          lever, checkpointed, recomputed):
    full, full_calls = fully_checkpointed
    extra = {"train.gradient_checkpointing": "true", **lever}
    with AttentionCalls() as calls:
        run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path, **extra)))
    assert [m.gradient_checkpointing for m in decoder_layers(run.trainer.model)] == checkpointed
    assert run.report["checkpointed_layers"] == sum(checkpointed)
    # full checkpointing runs each layer's attention again in backward: 6 steps x 2 layers more
    assert full_calls - calls.count == 6 * (2 - recomputed)
    assert losses(run) == pytest.approx(losses(full), abs=1e-5)
    a = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_a_resumed_wrap_up_reports_the_layers_its_training_checkpointed(fully_checkpointed, tiny_model, tiny_data,
                                                                       tmp_path):
    full, _ = fully_checkpointed
    out = tmp_path / "run"
    shutil.copytree(full.run_dir, out)
    for name in ("adapter", "report.json", "loss.png"):  # killed after its final checkpoint
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    extra = {"train.gradient_checkpointing": "true", "resume": "auto"}
    run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, out, **extra)))
    assert run.report["steps"] == full.report["steps"]
    assert run.report["checkpointed_layers"] == full.report["checkpointed_layers"] == 2


def test_liger_kernels_stop_before_the_model_loads_where_they_cannot_run(tiny_model, tmp_path):
    assert liger_wanted(False, "cpu", str(tiny_model)) is False
    with pytest.raises(UserError, match="Liger's kernels are Triton kernels for GPUs"):
        liger_wanted(True, "cpu", str(tiny_model))
    if importlib.util.find_spec("liger_kernel") is None:  # CI: the GPU-only extra is not installed
        with pytest.raises(UserError, match=r"needs the liger-kernel package .*pip install 'qlora\[liger\]'"):
            liger_wanted(True, "cuda", str(tiny_model))
    else:
        other = tmp_path / "model"
        other.mkdir()
        (other / "config.json").write_text('{"model_type": "no-such-model"}')
        with pytest.raises(UserError, match="Liger has no kernels for model type 'no-such-model'"):
            liger_wanted(True, "cuda", str(other))
        assert liger_wanted(True, "cuda", str(tiny_model)) is True
