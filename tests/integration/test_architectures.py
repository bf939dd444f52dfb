"""Each decoder family users bring, as a tiny random model: it trains through the real 4-bit path, its
run merges (or, where transformers fuses the experts the files hold apart, is refused by name), and it
generates. Gemma 2 and gpt-oss have no SDPA path in transformers (auto picks eager there)."""
import json

import pytest
import torch

from qlora.cli import main
from tests.conftest import make_tokenizer, tiny_overrides

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
# config class name, its own settings, whether merge folds every LoRA layer in
FAMILIES = {
    "qwen2": ("Qwen2Config", {}, True),
    "qwen3": ("Qwen3Config", dict(head_dim=128), True),
    "mistral": ("MistralConfig", {}, True),
    "phi3": ("Phi3Config", dict(pad_token_id=0), True),
    "phi": ("PhiConfig", {}, True),
    "gemma2": ("Gemma2Config", dict(head_dim=16), True),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=64), True),
    "olmo2": ("Olmo2Config", {}, True),
    "granite": ("GraniteConfig", {}, True),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32), False),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), False),
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=64),
                True),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_merges_and_generates(family, tiny_data, tmp_path, capsys):
    import transformers

    config_class, own, merges = FAMILIES[family]
    base = tmp_path / family
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **own})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(base, tiny_data, run, **{"train.max_steps": 2})]) == 0, \
        capsys.readouterr().err
    merged = tmp_path / "merged"
    code = main(["merge", f"adapter={run}", f"output_dir={merged}", "merge.dtype=float32"])
    err = capsys.readouterr().err
    if merges:
        assert code == 0, err
        assert json.loads((merged / "merge_report.json").read_text())["top1_agreement"] == 1.0
    else:
        assert code == 1 and "hold no weight named for" in err and "mlp.experts" in err, err
        assert not merged.exists()
    assert main(["generate", f"adapter={run}", "prompt=Hello", "gen.max_new_tokens=3"]) == 0
    assert "Traceback" not in capsys.readouterr().err
