"""lora.init=loftq: LoRA starts at the best rank-r fix of each 4-bit layer's quantization error."""
import json

import pytest
import torch

from qlora.cli import main
from qlora.loftq import best_rank_r, loftq_start
from tests.conftest import tiny_overrides


def test_the_start_is_the_truncated_svd_at_the_lora_scale():
    torch.manual_seed(0)
    low = torch.randn(40, 3) @ torch.randn(3, 24)  # rank 3: a rank-4 start holds it whole
    a, b = best_rank_r(low, 4, scale=2.0)
    assert a.shape == (4, 24) and b.shape == (40, 4)
    assert torch.allclose(2.0 * b @ a, low, atol=1e-4)
    full = torch.randn(40, 24)
    a, b = best_rank_r(full, 4, scale=0.5)
    optimum = torch.linalg.svdvals(full)[4:].square().sum().sqrt()  # Eckart-Young: what rank 4 must leave
    assert (full - 0.5 * b @ a).norm() == pytest.approx(float(optimum), rel=0.01)


def test_the_4bit_model_with_its_loftq_start_is_closer_to_the_original(tiny_model):
    """Layer by layer, Q + s B A is nearer the original W than Q; and the model's logits nearer the
    unquantized model's than the 4-bit model's own (LoRA at zero)."""
    from transformers import AutoModelForCausalLM

    from qlora.adapters import attach_lora
    from qlora.config import LoraConfig, ModelConfig, QuantConfig
    from qlora.models import load_base_model

    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = load_base_model(str(tiny_model), ModelConfig(name_or_path=str(tiny_model)), QuantConfig(), "cpu",
                            torch.float32)
    model = attach_lora(model, LoraConfig(r=8, lora_alpha=16), False)
    ids = torch.randint(10, 100, (2, 24))
    with torch.no_grad():
        want = original(input_ids=ids).logits
        plain = model(input_ids=ids).logits
        layers, missed, left = loftq_start(model, str(tiny_model))
        started = model(input_ids=ids).logits
    assert layers == 14 and missed == 0 and 0 < left < 0.9  # 2 layers x 7 projections; rank 8 of 64 takes a share of the error
    assert (started - want).norm() < 0.95 * (plain - want).norm()
    import bitsandbytes.functional as bnbf

    weights = dict(original.named_parameters())
    for name, module in model.get_base_model().named_modules():
        if "default" in getattr(module, "lora_A", {}):
            w = weights[f"{name}.weight"]
            base = module.get_base_layer().weight
            q = bnbf.dequantize_4bit(base.data, base.quant_state).float()
            fix = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            assert (w - q - fix).norm() < (w - q).norm(), name


def test_a_loftq_run_trains_and_merges_to_its_adapter_model(tiny_model, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_model, tiny_data, run, **{"lora.init": "loftq"})]) == 0
    assert "lora.init=loftq: LoRA in 14 layers starts at the best rank-8 fix" in capsys.readouterr().err
    out = tmp_path / "merged"
    assert main(["merge", f"adapter={run}", f"output_dir={out}", "merge.dtype=float32"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["top1_agreement"] == 1.0 and report["max_logit_diff"] < 1e-4, report
