"""Every speed lever leaves training where it was: same losses and adapter with it on and off."""
import importlib.util
import json
import shutil
from functools import partial

import pytest
from safetensors.torch import load_file

from qlora.cli import compose
from qlora.errors import UserError
from qlora.speed import compile_problem, decoder_layers, liger_wanted
from qlora.train import fit
from tests.conftest import tiny_overrides


def metrics(run, key):
    lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if key in r]


def losses(run):
    return metrics(run, "loss")


def test_head_tiles_worked_in_place_give_trl_s_numbers():
    """Tile by tile against TRL's own torch code, targets at tile edges and ties for the top token
    within and across tiles (top-1 counts only the first maximum)."""
    import math

    import torch
    from trl.kernels import chunked_logprob as ck

    from qlora.speed import _backward_tile_in_place, _forward_tile_in_place

    torch.manual_seed(0)
    tokens, cols, vocab = 40, 64, 256
    logits = torch.randn(tokens, vocab) * 3
    targets = torch.randint(0, vocab, (tokens,))
    targets[:6] = torch.tensor([0, 63, 64, 255, 10, 200])
    logits[4, [3, 10]] = logits[5, [70, 200]] = 20.0  # the target ties an earlier column: no hit
    logits[6, [10, 100]] = 20.0
    targets[6] = 10  # the target ties a later column: a hit
    logits[7, 30] = 20.0
    targets[7] = 30
    flags = dict(logit_scale=1.0, softcap=1.0, inv_t=1.0, HAS_SOFTCAP=False, HAS_ENTROPY=True,
                 HAS_LOG_SUM_SQ_PROBS=False, HAS_MEAN_LOGITS=False, HAS_IS_TOP1=True, BLOCK_SIZE=0)
    sums = {}
    for name, fold in (("trl", ck._forward_tile), ("ours", partial(_forward_tile_in_place, ck._forward_tile))):
        s = [torch.full((tokens,), -math.inf)] + [torch.zeros(tokens) for _ in range(4)] + \
            [torch.full((tokens,), -math.inf), torch.zeros(tokens)]
        for start in range(0, vocab, cols):
            fold(logits[:, start:start + cols].clone(), cols, targets, *s, start, cols, **flags)
        running_max, sum_exp, x_sum_exp, _, _, before, target = s
        sums[name] = dict(log_z=running_max + sum_exp.log(), entropy=x_sum_exp / sum_exp, target=target,
                          top1=(target >= running_max) & (target > before))
    assert sums["ours"]["top1"].tolist() == sums["trl"]["top1"].tolist()
    assert sums["trl"]["top1"][[4, 5, 6, 7]].tolist() == [False, False, True, True]
    for key in ("log_z", "entropy", "target"):
        assert torch.allclose(sums["ours"][key], sums["trl"][key], rtol=1e-6, atol=1e-5), key
    log_z, grad = sums["trl"]["log_z"], torch.rand(tokens)
    back = dict(logit_scale=1.0, softcap=1.0, inv_t=1.0, HAS_SOFTCAP=False, HAS_LOGPROB_GRAD=True,
                HAS_ENTROPY_GRAD=False, BLOCK_SIZE=0)
    for start in range(0, vocab, cols):
        theirs, ours = logits[:, start:start + cols].clone(), logits[:, start:start + cols].clone()
        ck._backward_tile(theirs, cols, targets, log_z, log_z, grad, log_z, start, cols, **back)
        _backward_tile_in_place(ck._backward_tile, ours, cols, targets, log_z, log_z, grad, log_z, start, cols, **back)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)


PADDED = {"data.padding_free": "false"}  # one attention call per layer and pass, one compiled graph


@pytest.mark.parametrize("lever", ["train.score_trained_only", "train.small_head_tiles", "train.head_tiles_in_place",
                                   "train.head_one_pass", "train.fused_lora", "train.fast_dequant", "train.optim",
                                   pytest.param("train.compile", marks=pytest.mark.slow)])
def test_lever_on_and_off_train_the_same(tiny_model, tiny_data, tmp_path, lever, monkeypatch):
    # train.optim: auto (PyTorch's fused AdamW on CPU) against the for-loop AdamW
    # the tiny model's ~400-word vocabulary and 4 x 128 batches fit in one real tile: split them here
    monkeypatch.setattr("qlora.speed.CPU_HEAD_TILE", (96, 64))
    fused = []  # the layers' passes through LoraMatmul4bit; the head's backward passes with its one-pass gradient
    if lever == "train.fused_lora":
        from qlora.fused_lora import LoraMatmul4bit

        monkeypatch.setattr(LoraMatmul4bit, "apply", partial(lambda apply, *a: fused.append(1) or apply(*a),
                                                             LoraMatmul4bit.apply))
    if lever == "train.fast_dequant":
        from qlora import dequant

        monkeypatch.setattr(dequant, "_fill", partial(lambda fill, *a: fused.append(1) or fill(*a), dequant._fill))
    if lever == "train.head_one_pass":
        from qlora.one_pass_head import OnePassLogProb

        monkeypatch.setattr(OnePassLogProb, "backward", staticmethod(partial(
            lambda backward, ctx, *g: fused.append(ctx.gradient is not None) or backward(ctx, *g),
            OnePassLogProb.backward)))
    if lever == "train.compile":  # the toolchain check's own tiny graph is compiled before counting
        from torch._dynamo.utils import counters

        compile_problem("cpu")
        counters.clear()
    runs, passes = {}, {}
    values = {True: "auto", False: "adamw_torch"} if lever == "train.optim" else {True: "true", False: "false"}
    # train.compile: one graph with padded micro-batches (data.padding_free's own test is below)
    extra = PADDED if lever == "train.compile" else {}
    for on in (True, False):
        cfg = compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / f"{on}", **extra, **{lever: values[on]}))
        runs[on] = fit(cfg)
        passes[on], fused[:] = sum(fused), []
    if lever == "train.fused_lora":  # each step, every LoRA layer (2 layers x 7), and only with the lever on
        assert passes[True] >= 14 * len(losses(runs[True])) and passes[False] == 0
    if lever == "train.fast_dequant":  # each step, every 4-bit layer's forward (and backward), only with the lever on
        assert passes[True] >= 14 * len(losses(runs[True])) and passes[False] == 0
        assert (runs[True].report["dequant_kernel"], runs[False].report["dequant_kernel"]) == (True, False)
    if lever == "train.head_one_pass":  # each step's head backward used the gradient formed in the forward
        assert passes[True] >= len(losses(runs[True])) and passes[False] == 0
    if lever == "train.optim":
        assert [runs[on].trainer.optimizer.optimizer.defaults["fused"] for on in (True, False)] == [True, None]
    if lever == "train.compile":  # layer 2 of 2 was compiled (the first stays eager), and is eager again after
        assert (runs[True].report["compiled_layers"], runs[False].report["compiled_layers"]) == (1, 0)
        layers = decoder_layers(runs[True].trainer.model)
        assert len(layers) == 2 and not any("forward" in vars(m) for m in layers)
        # one graph, traced once (no second trace for LoRA's scaling) and held by AOTAutograd's cache
        assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["total"] == 1
        assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), abs=1e-5)
    assert metrics(runs[True], "entropy") == pytest.approx(metrics(runs[False], "entropy"), abs=1e-5)
    assert metrics(runs[True], "mean_token_accuracy") == metrics(runs[False], "mean_token_accuracy")
    a = load_file(str(runs[True].run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs[False].run_dir / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_bf16_base_products_train_as_fp32_ones_to_bf16_rounding(tiny_model, tiny_data, tmp_path, monkeypatch):
    """train.bf16_base_products (on under auto only where the CPU has bf16 units; forced here, which any
    CPU computes, slowly where it has none): the run says so, the 4-bit layers and the LM head make
    their products in bf16, and it trains as fp32 products do."""
    from qlora import fused_lora as fl
    from qlora import one_pass_head as head

    bf16_passes, bf16_heads = [], []
    monkeypatch.setattr(fl.LoraMatmul4bit, "apply", partial(
        lambda apply, *a: bf16_passes.append(a[-1]) or apply(*a), fl.LoraMatmul4bit.apply))
    monkeypatch.setattr(head.OnePassLogProb, "apply", partial(
        lambda apply, *a: bf16_heads.append(head._bf16_products) or apply(*a), head.OnePassLogProb.apply))
    runs = {}
    for value in ("true", "false"):
        cfg = compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / value,
                                              **{"train.bf16_base_products": value}))
        runs[value] = fit(cfg)
        assert runs[value].report["bf16_base_products"] is (value == "true")
        assert bf16_passes and set(bf16_passes) == {value == "true"}  # every layer's every pass
        assert bf16_heads and set(bf16_heads) == {value == "true"}
        bf16_passes.clear()
        bf16_heads.clear()
    assert losses(runs["true"]) != losses(runs["false"])
    assert losses(runs["true"]) == pytest.approx(losses(runs["false"]), abs=2e-2)
    a = load_file(str(runs["true"].run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["false"].run_dir / "adapter" / "adapter_model.safetensors"))
    difference = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 / sum(b[k].norm() ** 2 for k in b) ** 0.5
    assert difference < 0.05, difference  # Adam's steps of the weights whose gradients are near 0 may differ


@pytest.mark.slow
def test_compiled_layers_train_padding_free_micro_batches_as_eager_ones(tiny_model, tiny_data, tmp_path):
    """data.padding_free's attention stays outside the compiled graphs: the same losses and adapter as
    eager layers, and the graphs are compiled in the first steps, not again at every step (as they
    were when its Python was traced)."""
    from torch._dynamo.utils import counters

    compile_problem("cpu")
    counters.clear()
    runs, graphs = {}, 0
    for on in ("true", "false"):
        runs[on] = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / on, **{
            "train.compile": on, "train.max_steps": 8, "data.padding_free": "true"})))
        graphs = graphs or counters["stats"]["unique_graphs"]
    assert runs["true"].report["compiled_layers"] == 1
    assert 0 < graphs <= 4, graphs  # the layer's two halves around the attention, each again for new lengths
    assert losses(runs["true"]) == pytest.approx(losses(runs["false"]), abs=1e-5)
    a = load_file(str(runs["true"].run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["false"].run_dir / "adapter" / "adapter_model.safetensors"))
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
        run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, out, **PADDED,
                                                  **{"train.gradient_checkpointing": "true"})))
    return run, calls.count


@pytest.mark.parametrize("lever, checkpointed, recomputed", [
    ({"train.checkpoint_layers": 1}, [True, False], 1),  # the first layer alone
    ({"train.checkpoint_attention": "true"}, [True, True], 0),  # both layers checkpointed, attention kept
    ({"train.gradient_checkpointing": "false"}, [False, False], 0),
])
def test_checkpointing_levers_train_as_full_checkpointing(fully_checkpointed, tiny_model, tiny_data, tmp_path,
                                                          lever, checkpointed, recomputed):
    full, full_calls = fully_checkpointed
    extra = {"train.gradient_checkpointing": "true", **PADDED, **lever}
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


@pytest.mark.slow
def test_neftune_noise_under_compiled_layers_trains_as_under_eager_ones(tiny_model, tiny_data, tmp_path,
                                                                       monkeypatch):
    """train.neftune_noise_alpha with train.compile: the noise is added by a hook on the input embeddings,
    outside the compiled layers, so a compiled run gets it at every training forward, draws the same
    noise and trains as the eager run does."""
    from qlora.neftune import EmbeddingNoise

    compile_problem("cpu")
    noised, add = [], EmbeddingNoise.add_noise  # noised: one entry per forward that got noise

    def counted(self, module, args, output):
        noised.append(module.training)
        return add(self, module, args, output)

    monkeypatch.setattr(EmbeddingNoise, "add_noise", counted)
    runs, counts = {}, {}
    for on in ("true", "false"):
        runs[on] = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / on, **PADDED, **{
            "train.compile": on, "train.max_steps": 8, "train.neftune_noise_alpha": 5})))
        counts[on], noised[:] = sum(noised), []
    assert runs["true"].report["compiled_layers"] == 1
    assert counts["true"] == counts["false"] >= 8  # every step's training forward
    assert losses(runs["true"]) == pytest.approx(losses(runs["false"]), abs=1e-5)
    a = load_file(str(runs["true"].run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["false"].run_dir / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
