"""Each decoder family users bring, as a tiny random model: it trains through the real 4-bit path, its
run merges (a mixture's LoRA on the experts that transformers fuses as it loads them, split back into the
experts the files hold apart), it generates, and it exports to GGUF. Gemma 2 and
gpt-oss have no SDPA path in transformers (auto picks eager there)."""
import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file

from qlora.cli import main
from tests.conftest import make_tokenizer, tiny_overrides

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
# config class name, its own settings, whether LoRA goes on the experts of a mixture
FAMILIES = {
    "qwen2": ("Qwen2Config", {}, False),
    "qwen3": ("Qwen3Config", dict(head_dim=128), False),
    "mistral": ("MistralConfig", {}, False),
    "phi3": ("Phi3Config", dict(pad_token_id=0), False),
    "phi": ("PhiConfig", {}, False),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16), False),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64), False),
    "olmo2": ("Olmo2Config", {}, False),
    "granite": ("GraniteConfig", {}, False),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True), True),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), True),
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=64),
                False),  # PEFT's all-linear leaves gpt-oss's experts alone
}



@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_merges_and_generates(family, tiny_data, tmp_path, capsys):
    import transformers

    config_class, own, lora_on_experts = FAMILIES[family]
    base = tmp_path / family
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **own})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(base, tiny_data, run, **{"train.max_steps": 2})]) == 0, \
        capsys.readouterr().err
    merged = tmp_path / "merged"
    assert main(["merge", f"adapter={run}", f"output_dir={merged}", "merge.dtype=float32"]) == 0, \
        capsys.readouterr().err
    assert json.loads((merged / "merge_report.json").read_text())["top1_agreement"] == 1.0
    # the files' keys kept; a mixture's expert weights (one tensor each in the files) written as training
    # saw them: in 4 bits (quant.experts_in_4bit), with their LoRA where PEFT puts it
    before, after = load_file(str(base / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert set(before) == set(after)
    experts = [k for k in before if ".experts." in k and not k.endswith("_bias")]
    changed = [k for k in experts if not torch.equal(before[k], after[k])]
    assert len(changed) == len(experts) and (experts or not lora_on_experts), (len(changed), len(experts))
    if experts and not lora_on_experts:
        for key in experts:
            codes, state = bnbf.quantize_4bit(before[key], blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(after[key], bnbf.dequantize_4bit(codes, state)), key
    capsys.readouterr()  # (transformers' log handler, made in an earlier test, writes to that test's closed stream)
    assert main(["generate", f"adapter={run}", "prompt=Hello", "gen.max_new_tokens=3"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    # GGUF: every family here is written (test_llama_cpp.py runs each in llama.cpp)
    code = main(["export", f"adapter={run}", "export.format=gguf", f"output_dir={tmp_path / 'gguf'}"])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "gguf" / "model-f16.gguf").stat().st_size > 0, err
