"""Base checkpoints stored quantized already: gpt-oss as OpenAI ships it (its experts in MXFP4, blocks and
scales) is converted once to bf16 and then trains and merges as any model; another method is refused before
anything loads."""
import json

import pytest
import torch

from qlora.cli import main
from tests.conftest import make_tokenizer, tiny_overrides

# MXFP4's 16 values (e2m1), by their 4-bit code
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4(weight: torch.Tensor):
    """(blocks, scales) of an (experts, out, in) weight as gpt-oss's files hold them: blocks of 32 values along
    `in`, two 4-bit codes a byte (the first in the low half), a power-of-two scale a block stored as its
    exponent + 127."""
    experts, rows, cols = weight.shape
    groups = weight.reshape(experts, rows, cols // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    codes = (groups / torch.pow(2.0, exponent)[..., None])[..., None].sub(FP4).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def tiny_gpt_oss_in_mxfp4(folder):
    """A tiny random gpt-oss saved as openai/gpt-oss-20b is: experts' weights as *_blocks and *_scales, the
    config's quantization_config mxfp4. Returns the folder and the first layer's gate_up experts before MXFP4."""
    from safetensors.torch import load_file, save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    tok = make_tokenizer()
    config = GptOssConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=64, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    tensors = {}
    for key, value in load_file(str(folder / "model.safetensors")).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):  # held (experts, in, out)
            tensors[key + "_blocks"], tensors[key + "_scales"] = mxfp4(value.float().transpose(1, 2))
        else:
            tensors[key] = value
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, model.model.layers[0].mlp.experts.gate_up_proj.detach()


def test_gpt_oss_in_mxfp4_is_converted_once_then_trains_and_merges(tiny_data, tmp_path, monkeypatch, capsys):
    """transformers loads a model through one quantizer, so gpt-oss's MXFP4 checkpoint cannot be loaded in
    bitsandbytes' 4-bit as it is (a ValueError from inside transformers). Its experts are converted once to the
    bf16 values transformers itself dequantizes them to; the run trains, merges and reuses the conversion."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    base, original = tiny_gpt_oss_in_mxfp4(tmp_path / "gpt-oss")
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(base, tiny_data, run, **{
        "train.max_steps": 2, "eval.exact_match": "false"})]) == 0
    assert "its experts are stored in MXFP4, which bitsandbytes does not read; converting them once" in \
        capsys.readouterr().err
    (converted,) = (tmp_path / "cache" / "mxfp4").iterdir()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    ours = load_file(str(converted / "model.safetensors"))
    theirs = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).state_dict()  # dequantized by it
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert ours[key].dtype == torch.bfloat16 and torch.equal(ours[key], theirs[key]), key
    # the weights before MXFP4, of up to ~0.4: near (4-bit values), not equal
    assert 0 < (ours["model.layers.0.mlp.experts.gate_up_proj"].float() - original).abs().max() < 0.1

    assert main(["merge", f"adapter={run}", f"output_dir={tmp_path / 'merged'}", "merge.dtype=float32"]) == 0
    err = capsys.readouterr().err
    assert "converting" not in err  # once
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["top1_agreement"] == 1.0 and report["max_logit_diff"] < 1e-3, report


@pytest.mark.parametrize("method", ["gptq", "fp8"])
def test_a_checkpoint_quantized_otherwise_is_refused_before_anything_loads(method, tiny_model, tiny_data, tmp_path,
                                                                           capsys):
    import shutil

    base = tmp_path / "model"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    assert main(["train", *tiny_overrides(base, tiny_data, tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"model.name_or_path={base}: its weights are stored quantized ({method})" in err, err
    assert "give the model's unquantized (bf16 or fp16) checkpoint" in err and "loading" not in err
