"""A mixture's experts held in 4 bits (quant.experts_in_4bit): training through them is training on their
NF4 values, LoRA on them learns, and the model holds only the codes between forwards."""
import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file

from qlora.adapters import attach_lora
from qlora.cli import compose, main
from qlora.config import LoraConfig
from qlora.experts_4bit import STATE, expert_tensors
from qlora.models import load_base_model
from tests.conftest import experts_lora_ways, tiny_overrides


def lora_model(folder, checkpointing: bool, in_4bit: bool):
    """The tiny mixture in 4 bits with LoRA (its B non-zero, so that it counts); its experts either held
    in 4 bits or rounded to their NF4 values and held in full."""
    cfg = compose("train", [f"model.name_or_path={folder}", f"quant.experts_in_4bit={str(in_4bit).lower()}"])
    model = load_base_model(str(folder), cfg.model, cfg.quant, "cpu", torch.float32)
    if not in_4bit:
        for _, module, name in expert_tensors(model):
            p = getattr(module, name)
            p.data = bnbf.dequantize_4bit(*bnbf.quantize_4bit(p.data, blocksize=64, compress_statistics=True,
                                                             quant_type="nf4"))
    torch.manual_seed(0)
    model = attach_lora(model, LoraConfig(r=4, lora_alpha=8), checkpointing, compute_dtype=torch.float32)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    return model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_experts_in_4bit_train_exactly_as_their_nf4_values(tiny_mixtral, checkpointing):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    runs = []
    for in_4bit in (False, True):
        model = lora_model(tiny_mixtral, checkpointing, in_4bit)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs.append((loss.item(), grads, model))
    (loss_full, grads_full, _), (loss_4bit, grads_4bit, model) = runs
    assert loss_4bit == loss_full
    assert grads_4bit.keys() == grads_full.keys()
    for name in grads_full:
        assert torch.equal(grads_4bit[name], grads_full[name]), name
    # LoRA on the experts learns; between forwards the model holds their 4-bit codes alone
    expert_lora = [n for n in grads_4bit if "experts" in n]
    assert expert_lora and all(grads_4bit[n].abs().sum() > 0 for n in expert_lora)
    held = [m for m in model.modules() if hasattr(m, STATE)]
    assert len(held) == 2 and not expert_tensors(model)
    for module in held:
        for name, packed in getattr(module, STATE).items():
            assert getattr(module, name) is packed.codes and packed.codes.dtype == torch.uint8
            assert packed.codes.numel() == packed.quant_state.shape.numel() // 2


def test_a_mixture_trains_with_its_experts_in_4bit_and_merges_into_either_base(tiny_mixtral, tiny_data, tmp_path,
                                                                               capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_mixtral, tiny_data, run, **{"train.max_steps": 2})]) == 0
    assert "expert weights (0.00 GiB in float32) held in 4-bit nf4" in capsys.readouterr().err
    merged, said = {}, {}
    for into in ("dequantized", "original"):
        out = tmp_path / into
        code = main(["merge", f"adapter={run}", f"output_dir={out}", "merge.dtype=float32", f"merge.into={into}",
                     "merge.min_top1_agreement=0"])
        said[into] = capsys.readouterr().err
        assert code == 0, said[into]
        merged[into] = load_file(str(out / "model.safetensors"))
    # the dequantized base is what training saw: that merged model is the adapter model
    assert "top-1 agreement 100.00%" in said["dequantized"]
    before = load_file(str(tiny_mixtral / "model.safetensors"))
    experts = [k for k in before if ".experts." in k]
    assert experts
    for key in experts:  # LoRA's change, added to the NF4 values or to the originals
        deq, orig = merged["dequantized"][key], merged["original"][key]
        assert not torch.equal(orig, before[key]) and not torch.equal(deq, orig)
        assert (deq - orig).abs().max() < (before[key].abs().max() / 4)  # (NF4's error, at most a quarter)


def test_experts_stay_in_full_where_quant_says(tiny_mixtral, tiny_data, tmp_path, capsys):
    overrides = tiny_overrides(tiny_mixtral, tiny_data, tmp_path / "run", **{"train.max_steps": 1})
    assert main(["train", *overrides, "quant.experts_in_4bit=false"]) == 0
    assert "expert weights (0.00 GiB in float32) stay in float32 (quant.experts_in_4bit=false" in \
        capsys.readouterr().err


def test_a_forward_without_gradient_dequantizes_only_the_routed_experts_to_the_same_logits(tiny_mixtral,
                                                                                            monkeypatch):
    """Generating, a token goes to 2 of a layer's 4 experts here: only those are dequantized, one by one,
    and the logits are those of the whole tensors dequantized (as a forward with gradient does)."""
    import qlora.experts_4bit as experts_4bit

    model = lora_model(tiny_mixtral, checkpointing=False, in_4bit=True).eval()
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        cached = model(input_ids=ids[:, :2], use_cache=True).past_key_values
    calls = []
    one_by_one = experts_4bit.dequantize_expert
    monkeypatch.setattr(experts_4bit, "dequantize_expert", lambda *a: calls.append(a[2]) or one_by_one(*a))
    with torch.no_grad():
        routed = model(input_ids=ids[:, 2:], past_key_values=cached, use_cache=False).logits
    assert 0 < len(calls) <= 2 * 2 * 2  # 2 layers, 2 tensors, at most 2 experts a token
    with torch.no_grad():
        cached = model(input_ids=ids[:, :2], use_cache=True).past_key_values
    monkeypatch.setattr(experts_4bit, "slices_by_expert", lambda packed: False)
    with torch.no_grad():
        whole = model(input_ids=ids[:, 2:], past_key_values=cached, use_cache=False).logits
    assert torch.equal(routed, whole)
    # and a forward with gradient, which dequantizes every expert, gives them too
    with torch.no_grad():
        cached = model(input_ids=ids[:, :2], use_cache=True).past_key_values
    assert torch.equal(model(input_ids=ids[:, 2:], past_key_values=cached, use_cache=False).logits.detach(), whole)


@pytest.mark.parametrize("in_4bit", [True, False])
def test_lora_on_experts_added_by_qlora_gives_peft_s_logits_and_gradients(tiny_mixtral, in_4bit):
    """LoRA on the experts is added by qlora (into the 4-bit experts' dequantized copy, or into a new
    tensor for experts held in full; without gradient, into the routed experts only), not through
    PEFT's parametrization: the logits and LoRA gradients are PEFT's, and with the adapter disabled
    the logits are the base model's."""
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    model = lora_model(tiny_mixtral, checkpointing=False, in_4bit=in_4bit)
    choose, taken_over = experts_lora_ways(model)
    assert taken_over == 4  # gate_up_proj and down_proj of 2 layers (the routers' LoRA is PEFT's)
    runs = {}
    for way in ("qlora", "peft"):
        choose(way)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            with model.disable_adapter():
                base = model(input_ids=ids).logits
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[way] = logits, base, grads
    (logits, base, grads), (peft_logits, peft_base, peft_grads) = runs["qlora"], runs["peft"]
    torch.testing.assert_close(logits, peft_logits, rtol=0, atol=1e-5)
    assert (logits - base).abs().max() > 1e-3  # the adapter counts here
    assert torch.equal(base, peft_base)
    expert_lora = [n for n in grads if "experts" in n]
    assert expert_lora and all(grads[n].abs().sum() > 0 for n in expert_lora)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-7)
    # between forwards, experts held in full hold their own weights again (4-bit ones their codes: above)
    for _, module, name in expert_tensors(model):
        assert isinstance(getattr(module, name), torch.nn.Parameter) and not getattr(module, name).requires_grad


@pytest.mark.slow
def test_a_mixture_with_4bit_experts_and_lora_on_them_trains_compiled_as_eager(tiny_mixtral, tiny_data, tmp_path):
    """train.compile on a mixture: the experts' hooks and LoRA added in place under torch.compile (which
    breaks the graph around them) train as eager does."""
    from qlora.train import fit

    runs = {}
    for on in ("true", "false"):
        cfg = compose("train", tiny_overrides(tiny_mixtral, tiny_data, tmp_path / on, **{
            "train.compile": on, "train.max_steps": 4, "data.padding_free": "false"}))
        runs[on] = fit(cfg)
    assert (runs["true"].report["compiled_layers"], runs["false"].report["compiled_layers"]) == (1, 0)
    curves = {on: [m["loss"] for m in map(json.loads, (r.run_dir / "metrics.jsonl").read_text().splitlines())
                   if "loss" in m] for on, r in runs.items()}
    assert len(curves["true"]) == 4 and curves["true"] == pytest.approx(curves["false"], abs=1e-5)
