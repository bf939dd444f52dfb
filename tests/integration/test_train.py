"""The real QLoRA path on CPU with a tiny random Llama: 4-bit base, LoRA, SFTTrainer, run directory."""
import json
from pathlib import Path

import pytest
import torch

from qlora.cli import main
from qlora.models import keep_4bit_layout
from tests.conftest import make_tokenizer, tiny_overrides, write_jsonl


def load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    keep_4bit_layout(model)  # not bitsandbytes' bf16-scaled inference layout on AVX512-BF16 CPUs: qlora's weights
    return model


def test_run_directory_has_the_contracted_layout(tiny_run):
    run, _ = tiny_run
    d = run.run_dir
    for name in ("config.yaml", "metrics.jsonl", "report.json", "loss.png"):
        assert (d / name).is_file(), name
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (d / "adapter" / name).is_file(), name
    assert sorted(p.name for p in (d / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert any((d / "tensorboard").rglob("events.out.tfevents*"))
    report = json.loads((d / "report.json").read_text())
    for key in ("steps", "train_tokens", "train_seconds", "tokens_per_second", "load_seconds",
                "time_to_first_step_seconds", "peak_memory_gb", "device", "loss_first", "loss_last",
                "eval_loss", "eval_exact_match", "versions"):
        assert key in report, key
    assert report["steps"] == 6 and report["device"] == "cpu"
    assert report["compiled_layers"] == 0, "train.compile=auto compiles only CPU runs of 200+ steps"
    assert report["tokens_per_second"] == pytest.approx(report["train_tokens"] / report["train_seconds"], rel=2e-2)
    lines = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all({"learning_rate", "grad_norm", "tokens", "seconds"} <= set(r) for r in lines if "loss" in r)


def test_training_changes_the_adapter_and_not_the_base(tiny_run, tiny_model):
    run, _ = tiny_run
    model = run.trainer.model
    fresh = load_4bit(tiny_model)
    trained = dict(model.get_base_model().named_parameters())
    for name, p in fresh.named_parameters():
        key = name.replace(".weight", ".base_layer.weight") if name not in trained else name
        assert torch.equal(trained[key].data.cpu(), p.data), f"base weight {name} changed"
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values()), "LoRA B starts at zero and must move"
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in dict(model.named_parameters()) if "lora_" in n}


def test_adapter_loads_in_plain_peft_with_the_same_logits(tiny_run, tiny_model):
    from peft import PeftModel

    run, _ = tiny_run
    ids = run.tokenizer("Maria is 34 years old and lives in Lisbon.", return_tensors="pt").input_ids
    model = run.trainer.model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_4bit(tiny_model), run.run_dir / "adapter").eval()
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_loss_goes_down_and_seeded_losses_are_pinned(tiny_run):
    run, _ = tiny_run
    lines = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0]
    # A silent change in data rendering, masking, LoRA init or the optimizer moves these numbers.
    assert losses == pytest.approx(PINNED_LOSSES, abs=2e-3), losses


PINNED_LOSSES = [6.0683, 6.0821, 5.9074, 5.7604, 5.7241, 5.7014]  # seed 0, CPU, fp32


def test_a_runs_config_yaml_is_a_recipe_that_trains_it_again(tiny_run, tmp_path):
    """recipe=RUN/config.yaml output_dir=NEW: every setting of the run, the recipe and the folder aside."""
    from qlora.cli import compose
    from qlora.inference import run_config

    run_dir = tiny_run[0].run_dir
    again = compose("train", [f"recipe={run_dir / 'config.yaml'}", f"output_dir={tmp_path / 'again'}"])
    trained = run_config(run_dir / "adapter")
    assert again.recipe == str(run_dir / "config.yaml") and again.output_dir == str(tmp_path / "again")
    again.recipe, again.output_dir = trained.recipe, trained.output_dir
    assert again == trained


def test_a_model_without_sdpa_trains_with_eager_attention_under_auto(tiny_data, tmp_path, capsys):
    """Gemma 2 (and gpt-oss) have no SDPA path in transformers: auto picks eager there, where it asked for
    SDPA and ended in transformers' traceback; asking for SDPA by name is refused in one line."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    base = tmp_path / "gemma2"
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    overrides = tiny_overrides(base, tiny_data, tmp_path / "run", **{"train.max_steps": 2})
    assert main(["train", *overrides]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 2
    assert main(["train", *overrides, f"output_dir={tmp_path / 'sdpa'}", "model.attn_implementation=sdpa"]) == 2
    err = capsys.readouterr().err
    assert "model.attn_implementation=sdpa: Gemma2ForCausalLM does not support an attention implementation through " \
           "torch.nn.functional.scaled_dot_product_attention; use model.attn_implementation=auto" in err, err
    assert "Traceback" not in err and not (tmp_path / "sdpa").exists()


def test_existing_output_dir_is_refused_with_the_resume_hint(tiny_run, capsys):
    _, overrides = tiny_run
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "resume=auto" in err and "overwrite=true" in err


def test_bad_data_line_fails_before_loading_the_model(tiny_model, tiny_data, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'])
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_model, tiny_data, out, **{"data.path": str(bad)})]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: the conversation does not end with an assistant message" in err
    assert not out.exists()


def test_folder_that_is_not_a_model_is_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(tmp_path, tiny_data, out)]) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err
    assert not out.exists()


def test_bitsandbytes_optimizers_train_on_cpu(tiny_model, tiny_data, tmp_path, capsys):
    """The 8-bit AdamW bitsandbytes runs on CPU too (its paged one unpaged there, with a note): the adapter
    moves as under PyTorch's AdamW, within the 8-bit state's rounding (lora.r=64: bitsandbytes keeps the
    state of a tensor under 4096 weights in 32 bits)."""
    from safetensors.torch import load_file

    weights = {}
    for optim in ("adamw_torch", "paged_adamw_8bit"):
        out = tmp_path / optim
        assert main(["train", *tiny_overrides(tiny_model, tiny_data, out, **{"train.optim": optim, "lora.r": 64})]) == 0
        weights[optim] = load_file(out / "adapter" / "adapter_model.safetensors")
    note = "train.optim=paged_adamw_8bit: paging optimizer state out of GPU memory needs CUDA"
    assert note in capsys.readouterr().err
    for name, w in weights["adamw_torch"].items():
        if "lora_B" in name:  # zero at the start, so its value is all update
            w8 = weights["paged_adamw_8bit"][name]
            cosine = torch.nn.functional.cosine_similarity(w.flatten(), w8.flatten(), 0)
            assert w.abs().max() > 0 and cosine > 0.95, (name, cosine)


def test_eval_every_n_steps_is_logged_plotted_and_the_best_checkpoint_kept(tiny_model, tiny_data, tmp_path, capsys):
    from qlora.cli import compose
    from qlora.train import fit

    cfg = compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / "run", **{
        "train.eval_steps": 2, "train.save_steps": 2, "train.save_total_limit": 1, "train.learning_rate": 0.05,
        "train.logging_steps": 4}))
    run = fit(cfg)
    lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in lines if "loss" in r}
    assert sorted(losses) == [4, 6] and run.report["loss_last"] == losses[6]  # the last steps' too, past step 4
    evals = {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r and r["step"] in (2, 4, 6) and "loss" not in r}
    assert sorted(evals) == [2, 4, 6]
    best_step = min(evals, key=evals.get)
    assert run.report["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert run.report["best_eval_loss"] == pytest.approx(evals[best_step])
    assert Path(run.report["best_checkpoint"]).is_dir() and (run.run_dir / "loss.png").is_file()
    # on the console, a line a log step (tracking.ProgressLines), not transformers' dicts
    out = capsys.readouterr()
    shown = [line.strip("\r ") for line in (out.out + out.err).splitlines() if "step " in line]
    assert any(line.startswith(f"step 6/6  loss {losses[6]:.4f}  grad norm ") and "tokens/s" in line for line in shown)
    assert any(line.startswith(f"step 2/6  held-out loss {evals[2]:.4f}") for line in shown)
    assert "{'loss'" not in out.out + out.err and "'eval_loss'" not in out.out + out.err


def test_16_bit_compute_keeps_frozen_weights_in_16_bits_and_lora_in_fp32(tiny_model):
    """The GPU memory lever, checked on CPU (bitsandbytes runs bf16 there too)."""
    from qlora.adapters import attach_lora
    from qlora.config import LoraConfig, ModelConfig, QuantConfig
    from qlora.models import load_base_model

    model = load_base_model(str(tiny_model), ModelConfig(name_or_path=str(tiny_model)), QuantConfig(), "cpu",
                            torch.bfloat16)
    model = attach_lora(model, LoraConfig(r=4), False, compute_dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)  # else the residual stream turns fp32
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs it on a GPU (bf16=True)
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in trainable)


def test_a_forward_without_gradient_leaves_the_4bit_weights_as_loaded_and_trainable(tiny_model):
    """On AVX512-BF16 CPUs bitsandbytes would repack every 4-bit layer for its bf16 kernel at the first
    forward without gradient (an evaluation during training), rounding its scales and cutting the
    gradient through it (qlora.models.keep_4bit_layout). Elsewhere it never repacks, and this holds
    as it stands."""
    from qlora.config import ModelConfig, QuantConfig
    from qlora.models import load_base_model

    model = load_base_model(str(tiny_model), ModelConfig(name_or_path=str(tiny_model)), QuantConfig(), "cpu",
                            torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])

    def input_gradient():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model.train()(inputs_embeds=embeds).logits.sum().backward()
        return embeds.grad

    loaded, trained = {name: t.clone() for name, t in model.state_dict().items()}, input_gradient()
    with torch.no_grad():
        model.eval()(input_ids=ids)
    assert torch.equal(input_gradient(), trained)
    after = model.state_dict()
    assert after.keys() == loaded.keys() and all(torch.equal(after[k], loaded[k]) for k in loaded)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads where files are mapped (Linux)")
def test_the_loaded_model_keeps_nothing_in_its_weights_file_s_memory_map(tiny_model):
    """tiny_model is stored in fp32, the dtype it loads in on CPU: transformers hands out its embeddings
    and norms as views of the file's memory map, which then stays open with every page read through it
    in the process's RSS. load_base_model copies them out (qlora.models.leave_weight_files)."""
    import gc

    from transformers import AutoModelForCausalLM

    from qlora.config import ModelConfig, QuantConfig
    from qlora.models import load_base_model, mapped_weight_files

    def in_map(model):
        spans = [(a, b) for a, b, path in mapped_weight_files() if Path(path).parent == tiny_model.resolve()]
        return [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in spans)]

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    assert "model.embed_tokens.weight" in in_map(plain)  # as transformers loads it
    # the tensors that stay as loaded (the linear layers' are quantized)
    expected = {n: p.detach().clone() for n, p in plain.named_parameters() if "embed" in n or "norm" in n}
    del plain
    gc.collect()

    model = load_base_model(str(tiny_model), ModelConfig(name_or_path=str(tiny_model)), QuantConfig(), "cpu",
                            torch.float32)
    assert in_map(model) == []
    got = dict(model.named_parameters())
    assert len(expected) == 6 and all(torch.equal(got[n], t) for n, t in expected.items())


def test_the_model_pads_as_the_tokenizer_so_training_starts_without_a_token_warning(tiny_model):
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import align_special_tokens

    from qlora.config import ModelConfig
    from qlora.models import load_tokenizer, pad_like_tokenizer

    tok = load_tokenizer(str(tiny_model), ModelConfig(name_or_path=str(tiny_model)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.eos_token_id  # as SmolLM2's configs
    assert tok.pad_token_id != tok.eos_token_id  # qlora pads with a token that is not EOS
    pad_like_tokenizer(model, tok)
    warned = []
    handler = logging.Handler()
    handler.emit = warned.append
    trainer_log = logging.getLogger("transformers.trainer_utils")
    trainer_log.addHandler(handler)
    try:
        align_special_tokens(model, tok)  # what transformers' Trainer runs when training starts
    finally:
        trainer_log.removeHandler(handler)
    assert [r.getMessage() for r in warned] == []
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id


def test_the_schedule_takes_its_arguments(tiny_model, tiny_data, tmp_path):
    from qlora.cli import compose
    from qlora.train import fit

    overrides = tiny_overrides(tiny_model, tiny_data, tmp_path / "run", **{
        "train.max_steps": 3, "train.warmup_ratio": 0, "data.eval_path": "null", "eval.exact_match": "false",
        "train.lr_scheduler_type": "cosine_with_min_lr", "train.lr_scheduler_kwargs.min_lr_rate": 0.5})
    run = fit(compose("train", overrides))
    rates = [json.loads(line).get("learning_rate") for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    peak = 5e-3  # tiny_overrides' learning rate: cosine from it to half of it over 3 steps
    assert [r for r in rates if r is not None] == pytest.approx([peak, peak * 0.875, peak * 0.625])


def test_neftune_noise_changes_training_and_repeats_with_the_seed(tiny_run, tiny_model, tiny_data, tmp_path):
    """train.neftune_noise_alpha: the first step's loss is already another (the noise is in its forward);
    the same seed gives the same noise, so the same adapter."""
    from safetensors.torch import load_file

    plain, _ = tiny_run  # the same settings without noise
    adapters, reports = [], []
    for i in range(2):
        out = tmp_path / f"noisy{i}"
        assert main(["train", *tiny_overrides(tiny_model, tiny_data, out, **{"train.neftune_noise_alpha": 5})]) == 0
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
        reports.append(json.loads((out / "report.json").read_text()))
    assert reports[0]["loss_first"] != plain.report["loss_first"]
    assert reports[0]["loss_first"] == reports[1]["loss_first"]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_the_schedule_is_said_before_training():
    """Steps, rows a step and epochs, from the settings: what a run will cost shows before it starts."""
    from qlora.config import TrainConfig
    from qlora.tracking import schedule_line

    t = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert schedule_line(t, 60, 480, "examples") == \
        "60 optimizer steps of 8 examples (4 a micro-batch x 2 accumulated): 1.00 epoch(s) of 480"
    assert schedule_line(TrainConfig(per_device_train_batch_size=4), 6, 24, "packed rows") == \
        "6 optimizer steps of 4 packed rows (4 a micro-batch): 1.00 epoch(s) of 24"
