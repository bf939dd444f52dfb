"""GPU code paths (skipped without CUDA): fp16 compute must train where the plain stack crashes
(the grad scaler meets bf16 LoRA gradients), bf16 where the GPU has it, checkpointing on by default,
and the speed levers that change nothing but speed or memory."""
import functools
import json

import pytest
import torch

from qlora.cli import compose
from qlora.train import fit
from tests.conftest import experts_lora_ways, people_rows, tiny_overrides, write_jsonl

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiny_run_trains_on_gpu(tiny_model, tiny_data, tmp_path, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    cfg = compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / "run",
                                          **{"quant.bnb_4bit_compute_dtype": dtype}))
    run = fit(cfg)
    report = json.loads((run.run_dir / "report.json").read_text())
    assert report["compute_dtype"] == dtype and report["gradient_checkpointing"] is True
    assert report["loss_last"] < report["loss_first"]
    assert all(p.dtype == torch.float32 for p in run.trainer.model.parameters() if p.requires_grad)
    assert report["peak_memory_gb"] > 0


def test_compiled_layers_train_as_eager_ones_on_gpu(tiny_model, tiny_data, tmp_path):
    """train.compile=true on a GPU (auto leaves it off there: not measured yet): the same losses as
    eager layers, with gradient checkpointing on (the GPU default), within bf16/fp16 rounding."""
    losses = {}
    for on in (True, False):
        cfg = compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / str(on),
                                              **{"train.compile": str(on).lower()}))
        run = fit(cfg)
        assert run.report["compiled_layers"] == (1 if on else 0)  # all decoder layers but the first
        lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[on] = [r["loss"] for r in lines if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


@pytest.mark.parametrize("lever", [{"train.offload_checkpoints": "true"}, {"train.checkpoint_attention": "true"},
                                   {"train.checkpoint_layers": 1}])
def test_checkpointing_levers_train_as_full_checkpointing_on_gpu(tiny_model, tiny_data, tmp_path, lever):
    """Offloaded inputs (pinned CPU memory, copied back in backward), kept attention outputs (flash or
    memory-efficient SDPA kernels on a GPU) and the first layer alone checkpointed: the losses of full
    checkpointing, within bf16/fp16 rounding. Not yet run on a GPU."""
    losses = {}
    for name, extra in (("full", {}), ("lever", lever)):
        run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / name, **extra)))
        assert run.report["gradient_checkpointing"] is True
        lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in lines if "loss" in r]
    assert losses["lever"] == pytest.approx(losses["full"], rel=2e-2)


def test_liger_kernels_train_as_the_model_s_own_layers_on_gpu(tiny_model, tiny_data, tmp_path):
    """train.liger_kernels=true: the norms, SwiGLU and RoPE run Liger's Triton kernels, for the losses
    of transformers' own layers within bf16/fp16 rounding. Not yet run on a GPU."""
    pytest.importorskip("liger_kernel", reason="the GPU extra: pip install 'qlora[liger]'")
    losses, runs = {}, {}
    for on in (False, True):  # off first: Liger patches transformers' Llama classes for the whole process
        runs[on] = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / str(on),
                                                       **{"train.liger_kernels": str(on).lower()})))
        assert runs[on].report["liger_kernels"] is on
        lines = [json.loads(x) for x in (runs[on].run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[on] = [r["loss"] for r in lines if "loss" in r]
    norms = {type(m).__name__: m._get_name() for m in runs[True].trainer.model.modules() if "RMSNorm" in type(m).__name__}
    assert norms and set(norms.values()) == {"LigerRMSNorm"}, norms
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_lora_trains_as_peft_s_layers_on_gpu(tiny_model, tiny_data, tmp_path, dtype, monkeypatch):
    """train.fused_lora=true on a GPU (auto leaves GPUs to PEFT until measured there): every 4-bit LoRA
    layer, in the 16-bit compute dtype under autocast and checkpointing, goes through LoraMatmul4bit,
    for PEFT's losses within bf16/fp16 rounding. Not yet run on a GPU."""
    from functools import partial

    from qlora.fused_lora import LoraMatmul4bit

    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    calls = []
    monkeypatch.setattr(LoraMatmul4bit, "apply", partial(lambda apply, *a: calls.append(a[0].dtype) or apply(*a),
                                                         LoraMatmul4bit.apply))
    losses = {}
    for on in (True, False):
        run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / str(on), **{
            "train.fused_lora": str(on).lower(), "quant.bnb_4bit_compute_dtype": dtype})))
        assert run.report["fused_lora"] is on
        lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[on] = [r["loss"] for r in lines if "loss" in r]
        if on:  # 2 layers x 7 LoRA layers, forward and checkpointed recompute, every step; in the compute dtype
            assert len(calls) >= 2 * 14 * len(losses[on]) and set(calls) == {getattr(torch, dtype)}
            calls.clear()
    assert not calls
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


@pytest.mark.parametrize("layout", [{"data.packing": "true"}, {"data.padding_free": "true"}],
                         ids=["packed", "padding-free"])
def test_packed_and_padding_free_runs_train_as_padded_ones_on_gpu(tiny_model, tmp_path, layout):
    """Per-row packing (transformers' SDPA with its per-row mask on a GPU) and padding-free rows
    (torch's varlen attention, or SDPA example by example where it cannot run; auto leaves GPUs
    padded): every step sees all 8 examples, so the losses are the padded run's within bf16/fp16
    rounding, and the trained tokens the same. Not yet run on a GPU."""
    data = (write_jsonl(tmp_path / "t.jsonl", people_rows(8, seed=3)),
            write_jsonl(tmp_path / "e.jsonl", people_rows(2)))
    losses, tokens = {}, {}
    for name, extra in (("padded", {}), ("layout", layout)):
        run = fit(compose("train", tiny_overrides(tiny_model, data, tmp_path / name, **{
            "train.max_steps": 3, "train.per_device_train_batch_size": 8, "train.save_steps": 100, **extra})))
        lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in lines if "loss" in r]
        tokens[name] = run.report["train_tokens"]
        if name == "layout" and "data.padding_free" in layout and torch.cuda.get_device_capability()[0] >= 8:
            assert run.report["padding_free_attention"] == "varlen"  # flash attention: Ampere or newer
    assert tokens["layout"] == tokens["padded"] > 0
    assert len(losses["layout"]) == 3 and losses["layout"] == pytest.approx(losses["padded"], rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_padding_free_attention_is_one_varlen_kernel_with_the_loop_s_numbers_on_gpu(dtype, monkeypatch):
    """A one-row micro-batch on a GPU attends through torch's varlen_attn, one call for all its
    examples (TinyLlama's heads: 32 query, 4 key-value, 64 wide), with the output and gradients of
    SDPA example by example. Flash attention needs an Ampere GPU or newer; elsewhere the loop runs."""
    import torch.nn.attention.varlen as varlen
    from types import SimpleNamespace

    from qlora.padding_free import segment_attention, varlen_problem

    if torch.cuda.get_device_capability()[0] < 8 or (dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported()):
        pytest.skip("flash attention in this dtype needs a newer GPU")
    assert varlen_problem(str(torch.device("cuda", torch.cuda.current_device())), dtype, 32, 4, 64) is None
    calls = []
    real = varlen.varlen_attn  # counted, its signature kept: our arguments are read from it
    counted = functools.wraps(real)(lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(varlen, "varlen_attn", counted)
    lengths = [200, 17, 1024, 331, 1]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(1, h, sum(lengths), 64, device="cuda", dtype=dtype, generator=g).requires_grad_()
              for h in (32, 4, 4)]
    ours, _ = segment_attention(SimpleNamespace(is_causal=True), *inputs, None, scaling=0.125, position_ids=positions)
    assert len(calls) == 1 and ours.shape == (1, sum(lengths), 32, 64)
    loop = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
        for q, k, v in zip(*(t.split(lengths, 2) for t in inputs))], dim=2).transpose(1, 2)
    upstream = torch.randn(ours.shape, device="cuda", dtype=dtype, generator=g)
    tolerance = 1e-2 if dtype == torch.float16 else 3e-2  # of the largest value: the loop's own rounding in bf16
    for a, b in zip((ours, *torch.autograd.grad(ours, inputs, upstream)),
                    (loop, *torch.autograd.grad(loop, inputs, upstream))):
        assert (a.float() - b.float()).abs().max() <= tolerance * b.float().abs().max()


def test_loftq_neftune_and_early_stopping_train_on_gpu(tiny_model, tiny_data, tmp_path):
    """The training options whose code touches device tensors: LoftQ's start (the SVD on the GPU, the
    original weights read on the CPU), NEFTune's noise (its lengths moved to the embeddings' device),
    and early stopping's best adapter loaded back at the end. Not yet run on a GPU."""
    run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / "run", **{
        "lora.init": "loftq", "train.neftune_noise_alpha": 5, "train.max_steps": 40, "train.eval_steps": 1,
        "train.save_steps": 1, "train.save_total_limit": 40, "train.early_stopping_patience": 2,
        "train.learning_rate": 0.05})))
    report = run.report
    assert report["loss_first"] is not None and report["stopped_early"] in (True, False)
    best = report["best_checkpoint"]
    from safetensors.torch import load_file

    saved = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
    kept = load_file(f"{best}/adapter_model.safetensors")
    assert all(torch.equal(saved[k], kept[k]) for k in saved)


def test_the_merge_self_check_runs_from_cpu_ram_what_the_gpu_cannot_hold(tiny_model, tiny_data, tmp_path,
                                                                          monkeypatch):
    """An 8B model's self-check holds 32 GB in fp32, more than a 24 GB GPU: given room on the GPU for a fraction
    of the tiny model, the rest waits in CPU RAM and runs on the GPU layer by layer (accelerate's offloading),
    and the merge completes. On CPU, tests/integration/test_merge.py offloads to the disk. Not yet run on a GPU."""
    import transformers

    from qlora.cli import main

    run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / "run")))
    placed = set()
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spying(*args, **kwargs):
        model = original(*args, **kwargs)
        placed.update(getattr(model, "hf_device_map", {}).values())
        return model

    monkeypatch.setattr("qlora.merge.CHECK_MAX_MEMORY", {0: 100_000, "cpu": 10**10})  # bytes
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spying)
    out = tmp_path / "merged"
    # a random tiny model's near-uniform logits flip under 16-bit compute; the threshold is not the point here
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={out}", "merge.min_top1_agreement=0.5"]) == 0
    assert "cpu" in placed, placed
    assert json.loads((out / "merge_report.json").read_text())["tokens"] > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_experts_in_4bit_train_on_gpu(tiny_mixtral, tiny_data, tmp_path, dtype):
    """quant.experts_in_4bit on a GPU, through bitsandbytes' CUDA kernels: the experts are held as codes
    on the GPU, and the losses are those of experts held in full within the 4-bit rounding."""
    from qlora.experts_4bit import STATE

    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    losses = {}
    for in_4bit in (True, False):
        cfg = compose("train", tiny_overrides(tiny_mixtral, tiny_data, tmp_path / str(in_4bit),
                                              **{"quant.bnb_4bit_compute_dtype": dtype,
                                                 "quant.experts_in_4bit": str(in_4bit).lower()}))
        run = fit(cfg)
        held = [p for m in run.trainer.model.modules() for p in getattr(m, STATE, {}).values()]
        assert len(held) == (4 if in_4bit else 0)
        assert all(p.codes.is_cuda and p.codes.dtype == torch.uint8 for p in held)
        lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[in_4bit] = [x["loss"] for x in lines if "loss" in x]
    assert losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


@pytest.mark.parametrize("in_4bit", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lora_on_experts_added_by_qlora_matches_peft_s_on_gpu(tiny_mixtral, dtype, in_4bit):
    """LoRA on a mixture's experts (qlora/experts_lora.py) on a GPU, in 16 bits: the logits without
    gradient (routed experts only) and the LoRA gradients are those of PEFT's parametrization."""
    from qlora.adapters import attach_lora
    from qlora.config import LoraConfig
    from qlora.models import load_base_model

    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    torch_dtype = getattr(torch, dtype)
    cfg = compose("train", [f"model.name_or_path={tiny_mixtral}", f"quant.experts_in_4bit={str(in_4bit).lower()}"])
    model = load_base_model(str(tiny_mixtral), cfg.model, cfg.quant, "cuda", torch_dtype)
    torch.manual_seed(0)
    model = attach_lora(model, LoraConfig(r=8, lora_alpha=16), True, compute_dtype=torch_dtype)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    choose, taken_over = experts_lora_ways(model)
    assert taken_over == 4
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]], device="cuda")
    runs = {}
    for way in ("qlora", "peft"):
        choose(way)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        runs[way] = logits, [p.grad.float().flatten() for p in model.parameters() if p.requires_grad]
    (logits, grads), (peft_logits, peft_grads) = runs["qlora"], runs["peft"]
    torch.testing.assert_close(logits, peft_logits, rtol=0, atol=0.05)
    ours_all, theirs_all = torch.cat(grads), torch.cat(peft_grads)
    assert torch.nn.functional.cosine_similarity(ours_all, theirs_all, dim=0) > 0.999
