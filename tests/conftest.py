"""Shared fixtures: a tiny random Llama with a ChatML tokenizer, made in the test session, and one
trained run that several tests read (training is the slow part; do it once)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "Extract the person's name, age and city as JSON.",
    'Maria is 34 years old and lives in Lisbon. {"name": "Maria", "age": 34, "city": "Lisbon"}',
    "system user assistant You are a tiny test model. What is the capital of France? Paris.",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 { } [ ] : , \" ' . ? !",
]


def make_tokenizer(chat_template: str = CHATML):
    """A byte-level BPE tokenizer trained on a few lines, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>", chat_template=chat_template)


def make_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 64) saved as safetensors with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_gemma3_with_vision(folder: Path, head_dim: int = 16) -> Path:
    """A tiny random Gemma 3 with its vision tower (Gemma3ForConditionalGeneration, which AutoModelForCausalLM
    loads for its config): its files hold language_model.model.layers.0..., its modules are named
    model.language_model.layers.0..., transformers renaming the keys as it loads them."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=512, sliding_window=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, vision_use_head=False),  # as Gemma 3's
        mm_tokens_per_image=4, boi_token_index=500, eoi_token_index=501, image_token_index=502)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projector starts at zero: drawn at random, so that the vision part computes
        for name, p in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                p.normal_(0, 0.3 if p.ndim > 1 else 0.5)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    # an image processor's normalization, not Gemma 3's (0.5, 0.5): what is written follows the file
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma3ImageProcessor", "image_mean": GEMMA3_TEST_MEAN, "image_std": GEMMA3_TEST_STD}))
    return folder


GEMMA3_TEST_MEAN, GEMMA3_TEST_STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


# a mixture of experts large enough for its experts to weigh in memory and speed on CPU: 4 layers of 32
# experts of 768 (4 a token), 151M expert weights (bench/moe_experts.py, the planner's slow test)
MOE_ON_CPU = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=768)


def make_qwen3_moe(folder: Path, tok, **shape) -> Path:
    """A random Qwen3-MoE of that shape with that tokenizer, saved in bf16 as checkpoints are shipped."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def people_rows(n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    names, cities = ["Maria", "Kenji", "Aisha", "Lukas"], ["Lisbon", "Osaka", "Lima", "Oslo"]
    rows = []
    for _ in range(n):
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(20, 90)
        rows.append({"messages": [
            {"role": "user", "content": f"Extract the person's name, age and city as JSON.\n"
                                        f"{name} is {age} years old and lives in {city}."},
            {"role": "assistant", "content": json.dumps({"name": name, "age": age, "city": city})}]})
    return rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    """A tiny Mixtral (four experts a layer, two a token) and our tokenizer."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", people_rows(24)), write_jsonl(d / "eval.jsonl", people_rows(6, seed=1))


def experts_lora_ways(model):
    """A function that sets how LoRA on the model's experts is added: way="qlora" (experts_lora.py) or
    "peft" (PEFT's own parametrization); and how many PEFT wrappers qlora took over."""
    from peft.tuners.lora.layer import ParamWrapper

    ours = {m: m.forward for m in model.modules() if isinstance(m, ParamWrapper) and "forward" in vars(m)}

    def choose(way: str) -> None:
        for m, forward in ours.items():
            if way == "qlora":
                m.forward = forward
            else:
                vars(m).pop("forward", None)

    return choose, len(ours)


def tiny_overrides(model: Path, data, out: Path, **extra) -> list:
    train, held = data
    args = {"model.name_or_path": str(model), "data.path": str(train), "data.eval_path": str(held),
            "output_dir": str(out), "train.max_steps": 6, "train.per_device_train_batch_size": 4,
            "train.learning_rate": 5e-3, "train.logging_steps": 1, "train.save_steps": 3,
            "train.max_length": 128, "train.report_to": "[none]", "train.seed": 0, "lora.r": 8,
            # fp32 products on every CPU, so that pinned losses and levers' comparisons hold on CPUs with
            # bf16 units too (where auto turns them on); test_speed.py tests that lever itself
            "train.bf16_base_products": "false"}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tiny_data, tmp_path_factory):
    """One short CPU training through the real 4-bit path; returns (Run, overrides)."""
    from qlora.cli import compose
    from qlora.train import fit

    out = tmp_path_factory.mktemp("runs") / "tiny"
    overrides = tiny_overrides(tiny_model, tiny_data, out, **{"train.report_to": "[tensorboard]"})
    return fit(compose("train", overrides)), overrides


@pytest.fixture(scope="session")
def tiny_merged(tiny_run, tmp_path_factory) -> Path:
    """The tiny run merged in float32 (by `qlora merge`), shared by the merge and export tests."""
    from qlora.cli import main

    run, _ = tiny_run
    out = tmp_path_factory.mktemp("merged") / "m"
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={out}", "merge.dtype=float32"]) == 0
    return out


@pytest.fixture(autouse=True)
def hub_switch_kept():
    """qlora puts the process offline where the hub's host does not resolve (hub.go_offline), as it
    does not here: no test leaves that switch changed for the next."""
    from qlora.hub import hub_switch_restored

    with hub_switch_restored():
        yield


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow tests (real model, multi-process)")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
