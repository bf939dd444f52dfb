"""GGUF for each family as llama.cpp holds it (Qwen3, Llama 3.1, Phi-3, Gemma 2 and 3, Qwen3-MoE, Mixtral):
read back through transformers' GGUF reader where it has the family, tensor by tensor where not; the
rotary scalings llama.cpp reads; models llama.cpp would compute otherwise, refused."""
import math

import pytest
import torch

from qlora.cli import main
from qlora.merge import compare_logits

TEXTS = ["Maria is 34 years old and lives in Lisbon.", "What is the capital of France?"]


@pytest.mark.parametrize("kind,tol,top1", [("f32", 1e-5, 1.0), ("q8_0", 0.05, 0.9)])
def test_a_qwen3_model_exports_to_gguf_with_its_qk_norms_and_head_size(tmp_path, kind, tol, top1):
    """Qwen3: q and k normalized per head (attn_q_norm, attn_k_norm) and a head size that is not
    hidden / heads (128 against 64 / 4 here, as in Qwen3-0.6B's 128 against 1024 / 16: GGUF's key_length)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from tests.conftest import make_tokenizer

    base = tmp_path / "qwen3"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=128)).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", f"export.gguf_type={kind}",
                 f"output_dir={out}"]) == 0
    name = f"model-{kind}.gguf"
    reader = gguf.GGUFReader(str(out / name))
    assert reader.fields["qwen3.attention.key_length"].contents() == 128
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= {t.name for t in reader.tensors}
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    stats = compare_logits(ref, back, AutoTokenizer.from_pretrained(base), TEXTS)
    assert stats["max_logit_diff"] < tol and stats["top1_agreement"] >= top1 and stats["kl"] < 1e-3, stats


def test_llama_3_1_rotary_scaling_goes_into_the_gguf_as_llama_cpp_reads_it(tmp_path):
    """Llama 3.1 and 3.2 scale their rotary frequencies (rope_type llama3): GGUF holds a factor a frequency
    (rope_freqs), by which llama.cpp divides it; without it llama.cpp would run the model with the plain
    frequencies. transformers' GGUF reader leaves the tensor aside, so the file still loads there."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tests.conftest import make_tokenizer

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    base = tmp_path / "llama31"
    LlamaForCausalLM(config).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", "export.gguf_type=f32",
                 f"output_dir={tmp_path / 'gguf'}"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model-f32.gguf")).tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (np.arange(0, 32, 2) / 32)
    np.testing.assert_allclose(plain / factors, scaled.numpy(), rtol=1e-6)
    # high frequencies kept, low ones divided by the factor 8, those between smoothed
    np.testing.assert_allclose(factors[[0, -1]], [1.0, 8.0], rtol=1e-6)
    assert np.all(np.diff(factors) > -1e-6) and 1.5 < factors[8] < 7
    AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model-f32.gguf")


def tiny_family(folder, config_class: str, **own):
    """A tiny random model of a family (64 wide, two layers) with the tiny tokenizer; its norms drawn away from
    their initial values, so that a norm written wrong shows in the logits."""
    import transformers

    from tests.conftest import make_tokenizer

    config = getattr(transformers, config_class)(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 **own)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# family, config class, its settings (Gemma's head_dim and query_pre_attn_scalar both 256, as llama.cpp assumes
# of the 2B to 12B and transformers' GGUF reader of any), GGUF settings expected
FAMILY_EXPORTS = {
    "gemma2": ("Gemma2Config", dict(head_dim=256),
               {"gemma2.attention.sliding_window": 4096, "gemma2.attn_logit_softcapping": 50.0,
                "gemma2.final_logit_softcapping": 30.0, "gemma2.attention.key_length": 256}),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=256, sliding_window=64),
               {"gemma3.attention.sliding_window": 64, "gemma3.rope.freq_base": 1e6}),
    "phi3": ("Phi3Config", dict(pad_token_id=0, sliding_window=100),
             {"phi3.attention.sliding_window": 100, "phi3.rope.scaling.original_context_length": 4096,
              "phi3.rope.dimension_count": 16}),
    # experts of 768 (transformers' reader takes its default size), each layer's stacked into one tensor
    "qwen3moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
                 {"qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
                  "qwen3moe.expert_feed_forward_length": 768}),
}


@pytest.mark.parametrize("family", FAMILY_EXPORTS)
def test_gemma_phi3_and_qwen3_moe_export_to_gguf_and_load_back_with_the_same_logits(family, tmp_path):
    """Gemma 2 and 3: norms written as 1 + weight (llama.cpp's norms scale by the weight), softcapping and
    the sliding window in the metadata, q/k norms for Gemma 3; Phi-3: its fused qkv and gate_up products
    as llama.cpp's attn_qkv and ffn_up, its original context length; Qwen3-MoE: the experts, one tensor each
    in the files, stacked a layer (ffn_gate_exps...). transformers' reader reads them back."""
    import gguf
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tokenizer

    config_class, own, settings = FAMILY_EXPORTS[family]
    base = tiny_family(tmp_path / family, config_class, **own)
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", "export.gguf_type=f32",
                 f"output_dir={out}"]) == 0
    reader = gguf.GGUFReader(str(out / "model-f32.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == family
    assert {k: fields.get(k) for k in settings} == pytest.approx(settings)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    stats = compare_logits(ref, back, make_tokenizer(), TEXTS)
    assert stats["max_logit_diff"] < 1e-4 and stats["top1_agreement"] == 1.0, stats


def test_gemma3_with_vision_exports_its_language_model_and_an_mmproj_file(tmp_path, capsys):
    """Gemma 3 from 4B up holds a vision tower beside the language model (files: language_model.model...,
    vision_tower..., multi_modal_projector...). Its GGUF is the language model, as llama.cpp's main file
    holds it; on text it computes what the whole model does. The vision tower and projector go in an mmproj
    file beside it, as llama.cpp reads them (its images: tests/integration/test_llama_cpp.py)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from tests.conftest import GEMMA3_TEST_MEAN, make_tiny_gemma3_with_vision, make_tokenizer

    base = make_tiny_gemma3_with_vision(tmp_path / "gemma3", head_dim=256)
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", "export.gguf_type=f32",
                 f"output_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert "the GGUF holds the language model; the 23 tensors of the vision tower and its projector are not in " \
           "it" in err and "the vision tower and its projector in mmproj-f32.gguf" in err, err
    mmproj = gguf.GGUFReader(str(out / "mmproj-f32.gguf"))
    fields = {k: f.contents() for k, f in mmproj.fields.items() if not k.startswith("GGUF.")}
    assert (fields["general.architecture"], fields["general.type"], fields["clip.projector_type"]) == \
           ("clip", "mmproj", "gemma3")
    assert (fields["clip.vision.image_size"], fields["clip.vision.patch_size"], fields["clip.vision.block_count"],
            fields["clip.vision.projection_dim"], fields["clip.vision.projector.scale_factor"]) == (32, 8, 1, 64, 2)
    assert fields["clip.vision.image_mean"] == pytest.approx(GEMMA3_TEST_MEAN)  # the base's image processor's
    assert len(mmproj.tensors) == 23 and {"v.blk.0.attn_q.weight", "mm.input_projection.weight"} <= \
           {t.name for t in mmproj.tensors}
    assert main(["export", f"model.name_or_path={base}", "export.format=ollama", f"output_dir={tmp_path / 'o'}"]) == 0
    assert "the Modelfile's model reads text only" in capsys.readouterr().err
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == ["Modelfile", "model-f16.gguf"]
    names = {t.name for t in gguf.GGUFReader(str(out / "model-f32.gguf")).tensors}
    assert "blk.1.attn_k_norm.weight" in names and not any(n.startswith(("v.", "mm.")) for n in names)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert type(back).__name__ == "Gemma3ForCausalLM" and type(ref).__name__ == "Gemma3ForConditionalGeneration"
    stats = compare_logits(ref, back, make_tokenizer(), TEXTS)
    assert stats["max_logit_diff"] < 1e-4 and stats["top1_agreement"] == 1.0, stats


ROTARY = {
    # Gemma 3 from 4B up: linear scaling on the global layers only (llama.cpp leaves the sliding ones unscaled)
    "gemma3 linear": ("Gemma3TextConfig", dict(head_dim=256, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0, "gemma3.rope.freq_base": 1e6}),
    "qwen2 yarn": ("Qwen2Config", dict(max_position_embeddings=512, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1e6}),
        {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
         "qwen2.rope.scaling.original_context_length": 128}),
    # Phi-3's 128k models: long and short factors, which llama.cpp takes beyond the original context
    "phi3 longrope": ("Phi3Config", dict(pad_token_id=0, max_position_embeddings=512,
                                         original_max_position_embeddings=128, rope_parameters={
                                             "rope_type": "longrope", "rope_theta": 10000.0,
                                             "long_factor": [2.0] * 8, "short_factor": [1.0] * 8}),
                      {"phi3.rope.scaling.original_context_length": 128,
                       "phi3.rope.scaling.attn_factor": (1 + math.log(4) / math.log(128)) ** 0.5}),
}


@pytest.mark.parametrize("case", ROTARY)
def test_rotary_scaling_goes_into_the_gguf_as_llama_cpp_reads_it(case, tmp_path):
    import gguf

    config_class, own, settings = ROTARY[case]
    base = tiny_family(tmp_path / "base", config_class, **own)
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", "export.gguf_type=f32",
                 f"output_dir={out}"]) == 0
    reader = gguf.GGUFReader(str(out / "model-f32.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert {k: fields.get(k) for k in settings} == pytest.approx(settings)
    tensors = {t.name: t.data for t in reader.tensors}
    if case == "phi3 longrope":
        assert list(tensors["rope_factors_long.weight"]) == [2.0] * 8
        assert list(tensors["rope_factors_short.weight"]) == [1.0] * 8


REFUSED = {
    "gemma3 local rotary base": ("Gemma3TextConfig", dict(head_dim=256, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}),
        "llama.cpp assumes a rotary base of 10000, unscaled, in the sliding-window layers of gemma3"),
    "gemma2 layer pattern": ("Gemma2Config", dict(head_dim=256, layer_types=["full_attention", "full_attention"]),
                             "llama.cpp assumes one global-attention layer in every 2 of gemma2, where this model "
                             "has layer_types=['full_attention', 'full_attention']"),
    "gemma2 attention scale": ("Gemma2Config", dict(head_dim=16),
                               "llama.cpp assumes attention scaled by 1/sqrt(16) of gemma2, where this model has "
                               "query_pre_attn_scalar=256"),
    "qwen3moe unnormalized routing": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                              norm_topk_prob=False),
                                      "llama.cpp assumes every layer of qwen3moe a mixture"),
    "phi with q and k layer norms": ("PhiConfig", dict(qk_layernorm=True), "llama.cpp's phi2 has no layer norm of q and k"),
    "dynamic rotary scaling": ("LlamaConfig", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                    "rope_theta": 10000.0}),
                               "llama.cpp does not read 'dynamic' rotary scaling for llama"),
    "gpt-oss swiglu limit": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, swiglu_limit=10.0),
                             "llama.cpp clamps gpt-oss's SwiGLU at 7.0, where this model has swiglu_limit=10.0"),
    "gpt-oss layer pattern": ("GptOssConfig", dict(head_dim=16, num_local_experts=4,
                                                   layer_types=["sliding_attention", "sliding_attention"]),
                              "llama.cpp assumes one global-attention layer in every 2 of gpt-oss"),
    "an architecture not written": ("GPT2Config", {}, "not 'gpt2'; use export.format=safetensors"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_gguf_export_refuses_a_model_llama_cpp_would_compute_otherwise(case, tmp_path, capsys):
    """llama.cpp fixes some settings by architecture rather than reading them: a model that differs would load
    there and compute another function, so it is refused, exit 2, nothing written."""
    import transformers

    config_class, own, message = REFUSED[case]
    base = tmp_path / "base"
    getattr(transformers, config_class)(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **own).save_pretrained(base)
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "use export.format=safetensors" in err, err
    assert not out.exists()


def test_mixtral_experts_are_stacked_as_llama_cpp_holds_them(tmp_path):
    """Mixtral is llama.cpp's llama with experts: w1, w3 and w2 of every expert (block_sparse_moe.experts.N in
    the files) stacked a layer as ffn_gate_exps, ffn_up_exps and ffn_down_exps, expert e at index e; the
    router f32 under every type. (transformers' GGUF reader has no Mixtral to read it back with.)"""
    import gguf
    from safetensors.torch import load_file

    base = tiny_family(tmp_path / "mixtral", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2)
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", "export.gguf_type=q8_0",
                 f"output_dir={out}"]) == 0
    reader = gguf.GGUFReader(str(out / "model-q8_0.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert (fields["general.architecture"], fields["llama.expert_count"], fields["llama.expert_used_count"]) == \
           ("llama", 4, 2)
    tensors = {t.name: t for t in reader.tensors}
    files = load_file(str(base / "model.safetensors"))
    for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        t = tensors[f"blk.1.ffn_{ours}_exps.weight"]
        stacked = gguf.quants.dequantize(t.data, t.tensor_type)
        for e in range(4):
            expected = files[f"model.layers.1.block_sparse_moe.experts.{e}.{theirs}.weight"].numpy()
            assert abs(stacked[e] - expected).max() < 0.01 * abs(expected).max()
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"


@pytest.mark.parametrize("config_class,own,window", [
    ("MistralConfig", dict(sliding_window=4096), 4096),  # Mistral 7B v0.1
    ("MistralConfig", dict(sliding_window=None), None),  # v0.2 on
    ("Phi3Config", dict(sliding_window=2047), 2047),  # Phi-3-mini-4k
    ("Phi3Config", dict(sliding_window=262144, max_position_embeddings=131072), None),  # wider than its context
    ("Qwen2Config", dict(sliding_window=4096), None),  # use_sliding_window=false
    ("Qwen2Config", dict(sliding_window=4096, use_sliding_window=True, max_window_layers=1), 4096),
    ("Gemma2Config", dict(sliding_window=4096), None),  # llama.cpp applies Gemma's
])
def test_a_sliding_window_that_llama_cpp_leaves_out_is_found(config_class, own, window):
    """The export says when llama.cpp will attend over the whole context where the model slides a window
    (tests/integration/test_llama_cpp.py runs such files)."""
    import transformers

    from qlora.gguf_families import FAMILIES, window_left_out

    config = getattr(transformers, config_class)(num_hidden_layers=2, **own)
    assert window_left_out(config, FAMILIES[config.model_type]) == window
