"""Export: GGUF files that transformers' own GGUF loader reads back, a Modelfile, an NF4 folder."""
import json
import math

import pytest
import torch

from qlora.cli import main
from qlora.merge import compare_logits

TEXTS = ["Maria is 34 years old and lives in Lisbon.", "What is the capital of France?"]


# (kind, max logit difference, lowest top-1 agreement) against the merged model: the tiny random model's
# near-uniform logits make top-1 fragile under 4 and 5 bits, where its KL is still ~1e-4 (measured 3e-5 to 2.4e-4)
GGUF_KINDS = [("f32", 1e-5, 1.0), ("f16", 5e-3, 1.0), ("bf16", 1e-2, 1.0), ("q8_0", 0.05, 0.9),
              ("q5_1", 0.1, 0.7), ("q5_0", 0.1, 0.7), ("q4_1", 0.2, 0.7), ("q4_0", 0.2, 0.7)]


@pytest.mark.parametrize("kind,tol,top1", GGUF_KINDS, ids=[k[0] for k in GGUF_KINDS])
def test_gguf_loads_back_through_transformers_with_close_logits(tiny_merged, tmp_path, kind, tol, top1):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / kind
    assert main(["export", f"model.name_or_path={tiny_merged}", "export.format=gguf",
                 f"export.gguf_type={kind}", f"output_dir={out}"]) == 0
    name = f"model-{kind}.gguf"
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_merged, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_merged)
    stats = compare_logits(ref, back, tok, TEXTS)
    print(kind, stats)
    assert stats["max_logit_diff"] < tol and stats["top1_agreement"] >= top1 and stats["kl"] < 1e-3
    tok_back = AutoTokenizer.from_pretrained(out, gguf_file=name)
    assert tok_back(TEXTS[0]).input_ids == tok(TEXTS[0]).input_ids
    # the layers in the kind asked for; vectors f32; under 4 and 5 bits the embeddings and the LM head q8_0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / name)).tensors}
    low = kind.startswith(("q4", "q5"))
    expected = {n: "F32" if n.endswith("norm.weight") or kind == "f32" else
                "Q8_0" if low and n in ("token_embd.weight", "output.weight") else kind.upper() for n in types}
    assert types == expected


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


def sentencepiece_tokenizer():
    """Llama 2's kind of tokenizer (TinyLlama's, Mistral's) as transformers holds it: SentencePiece BPE, '▁'
    for each space and one before the text, a byte piece for each character not in the vocabulary, and
    <unk> <s> </s> first; learned on the tiny tokenizer's lines."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CORPUS

    specials = ["<unk>", "<s>", "</s>"]
    spaces = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learned = Tokenizer(models.BPE(unk_token="<unk>"))
    learned.normalizer, learned.pre_tokenizer = spaces, pre_tokenizers.Metaspace(prepend_scheme="never")
    learned.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=220, special_tokens=specials))
    model = json.loads(learned.to_str())["model"]
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = spaces
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template="{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                                                 "</s>\n{% endfor %}")


def test_a_sentencepiece_tokenizer_exports_to_gguf_as_llama_cpp_tokenizes(tmp_path):
    """TinyLlama's and Mistral's SentencePiece tokenizers: GGUF's "llama" tokenizer, a score a piece (llama.cpp
    joins the best-scored pair first) from the merges' order, byte pieces typed as bytes, a space put
    before the text. transformers' GGUF reader rebuilds the merges from those scores alone: its tokens
    are the tokenizer's, byte fallback ("ü") included."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = sentencepiece_tokenizer()
    base = tmp_path / "llama2"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", "export.gguf_type=f32",
                 f"output_dir={out}"]) == 0
    reader = gguf.GGUFReader(str(out / "model-f32.gguf"))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert "tokenizer.ggml.merges" not in reader.fields
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    back = AutoTokenizer.from_pretrained(out, gguf_file="model-f32.gguf")
    for text in TEXTS + ["Ünïcödé: ü is not in the vocabulary, so its bytes are"]:
        assert back(text, add_special_tokens=False).input_ids == tok(text).input_ids
    stats = compare_logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32),
                           tok, TEXTS)
    assert stats["max_logit_diff"] < 1e-5, stats


def test_gguf_files_shrink_with_the_bits(tiny_merged, tmp_path):
    sizes = {}
    for kind in ("f16", "q8_0", "q5_0", "q4_0"):
        assert main(["export", f"model.name_or_path={tiny_merged}", "export.format=gguf",
                     f"export.gguf_type={kind}", f"output_dir={tmp_path / kind}"]) == 0
        sizes[kind] = (tmp_path / kind / f"model-{kind}.gguf").stat().st_size
    assert sizes["f16"] > sizes["q8_0"] > sizes["q5_0"] > sizes["q4_0"], sizes


def test_gguf_metadata(tiny_merged, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    out = tmp_path / "g"
    assert main(["export", f"model.name_or_path={tiny_merged}", "export.format=gguf", f"output_dir={out}"]) == 0
    reader = gguf.GGUFReader(str(out / "model-f16.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.token")
              and k != "tokenizer.ggml.merges"}
    tok = AutoTokenizer.from_pretrained(tiny_merged)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # the tiny tokenizer splits text by GPT-2's rules
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] != tok.eos_token_id
    assert fields["tokenizer.chat_template"] == tok.chat_template


def test_ollama_modelfile_from_the_chat_template(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "ollama"
    assert main(["export", f"adapter={run.run_dir}", "export.format=ollama", f"output_dir={out}"]) == 0
    text = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in text and (out / "model-f16.gguf").is_file()
    assert '<|im_start|>{{ .Role }}' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a tiny test model."""' in text  # the template's default system message
    assert json.loads((out / "merge_report.json").read_text())["top1_agreement"] == 1.0


def test_nf4_export_reloads_and_reports_agreement(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run, _ = tiny_run
    out = tmp_path / "nf4"
    assert main(["export", f"adapter={run.run_dir}", "export.format=nf4", f"output_dir={out}",
                 "merge.min_top1_agreement_nf4=0.5"]) == 0
    report = json.loads((out / "nf4_report.json").read_text())
    assert 0.5 <= report["top1_agreement"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model, "is_loaded_in_4bit", False)


def test_nf4_export_below_its_threshold_fails_with_exit_1(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    out = tmp_path / "nf4"
    # a random tiny model re-quantized to NF4 cannot agree on every token
    assert main(["export", f"adapter={run.run_dir}", "export.format=nf4", f"output_dir={out}",
                 "merge.min_top1_agreement_nf4=1.0"]) == 1
    assert "below merge.min_top1_agreement_nf4=1.0" in capsys.readouterr().err
    assert not out.exists()


def test_bad_merge_settings_exit_2(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={tmp_path / 'm'}",
                 "merge.min_top1_agreement=1.5"]) == 2
    assert "merge.min_top1_agreement=1.5: must be in [0, 1]" in capsys.readouterr().err


def test_quant_report_on_a_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "qr"
    assert main(["quant", "report", f"model.name_or_path={tiny_model}", f"output_dir={out}"]) == 0
    rows = json.loads((out / "quant_report.json").read_text())
    layers = {r["layer"] for r in rows}
    assert len(layers) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    assert (out / "quant_report.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "| nf4 / block 64 + double quant |" in table

    def mean_sqnr(scheme):
        return sum(r["sqnr_db"] for r in rows if r["scheme"] == scheme) / len(layers)
    # on normally distributed weights NF4 beats the uniform 4-bit grids at the same block size
    assert mean_sqnr("nf4 / block 64") > mean_sqnr("int4 absmax / block 64") > mean_sqnr("int4 affine / tensor")


def test_ptq_reports_dynamic_and_static_int8_against_the_merged_model(tiny_merged, tiny_data, tmp_path, capsys):
    out = tmp_path / "ptq"
    assert main(["quant", "ptq", f"model.name_or_path={tiny_merged}", f"data.path={tiny_data[0]}",
                 f"data.eval_path={tiny_data[1]}", f"output_dir={out}"]) == 0
    rows = {r["model"]: r for r in json.loads((out / "ptq_report.json").read_text())["rows"]}
    ref, dyn, stat = rows["fp32 (merged)"], rows["dynamic int8"], rows["static int8 (simulated)"]
    weights_only = rows["int8 weights only (simulated)"]
    print(rows)
    assert dyn["size_mb"] < ref["size_mb"] and stat["size_mb"] < ref["size_mb"]
    assert weights_only["top1_agreement"] >= stat["top1_agreement"] - 0.02
    for r in (dyn, stat, weights_only):
        assert r["top1_agreement"] > 0.8 and abs(r["perplexity"] - ref["perplexity"]) / ref["perplexity"] < 0.05


def test_gguf_tensor_types_by_kind_name_and_shape():
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from qlora.config import GgufType
    from qlora.gguf_writer import tensor_type

    rows64, rows48 = np.zeros((4, 64), np.float32), np.zeros((4, 48), np.float32)
    assert tensor_type("blk.0.attn_q.weight", rows64, GgufType.q4_0) is Q.Q4_0
    assert tensor_type("blk.0.attn_q.weight", rows48, GgufType.q4_0) is Q.F16  # 48 is no whole number of 32-blocks
    assert tensor_type("token_embd.weight", rows64, GgufType.q5_1) is Q.Q8_0
    assert tensor_type("output.weight", rows64, GgufType.q8_0) is Q.Q8_0
    assert tensor_type("blk.0.attn_norm.weight", np.zeros(64, np.float32), GgufType.q4_0) is Q.F32
    assert tensor_type("blk.0.attn_q.weight", rows48, GgufType.bf16) is Q.BF16


@pytest.mark.parametrize("kind, name", [("llama3", "llama-bpe"), ("qwen2", "qwen2"), ("smollm", "smollm"),
                                        ("gpt2", "gpt-2"), ("whitespace", "default")])
def test_the_gguf_pre_tokenizer_is_named_as_llama_cpp_knows_it(kind, name, capsys):
    """llama.cpp splits text before the merges by the rules GGUF's tokenizer.ggml.pre names; its default
    splits punctuation off the space before it (' {"' in two), where the tokenizers trained on keep it
    whole. Built as the tokenizers library writes each into tokenizer.json."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from qlora.gguf_writer import LLAMA3_SPLIT, QWEN2_SPLIT, llama_cpp_pre

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pre = {"llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
           "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level]),
           "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False)]),
           "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
           "whitespace": pre_tokenizers.Whitespace()}[kind]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre
    assert llama_cpp_pre(json.loads(tokenizer.to_str())["pre_tokenizer"]) == name
    said = "llama.cpp does not know this tokenizer's pre-tokenizer by name" in capsys.readouterr().err
    assert said == (name == "default")
    if kind in ("llama3", "qwen2"):  # the two differ in digits
        pieces = [p for p, _ in pre.pre_tokenize_str(' {"age": 1234}')]
        assert pieces[0] == 'Ġ{"' and pieces[-3:-1] == (["123", "4"] if kind == "llama3" else ["3", "4"])


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


def test_gemma3_with_vision_exports_its_language_model(tmp_path, capsys):
    """Gemma 3 from 4B up holds a vision tower beside the language model (files: language_model.model...,
    vision_tower..., multi_modal_projector...). Its GGUF is the language model, as llama.cpp's main file
    holds it, and says what it left out; on text it computes what the whole model does."""
    import gguf
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_gemma3_with_vision, make_tokenizer

    base = make_tiny_gemma3_with_vision(tmp_path / "gemma3", head_dim=256)
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={base}", "export.format=gguf", "export.gguf_type=f32",
                 f"output_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert "the GGUF holds the language model; 23 tensor(s) of the vision tower and its projector are left " \
           "out" in err, err
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
    "dynamic rotary scaling": ("LlamaConfig", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                    "rope_theta": 10000.0}),
                               "llama.cpp does not read 'dynamic' rotary scaling for llama"),
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


GEMMA_JINJA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
               "{{ raise_exception('System role not supported') }}{% endif %}<start_of_turn>"
               "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
               "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_JINJA = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


MISTRAL_JINJA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
                 "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
LLAMA2_JINJA = ("{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
                "{% elif m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% else %} "
                "{{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("jinja,marks,stop", [
    (GEMMA_JINJA, ["<bos>", "<start_of_turn>model\\n"], "<end_of_turn>"),
    (PHI3_JINJA, ["<|{{ .Role }}|>\\n{{ .Content }}<|end|>"], "<|end|>"),
    (MISTRAL_JINJA, ["[INST] ", "(len (slice $.Messages $i)) 1", "{{ .Content }}[/INST]"], "[INST]"),
    (LLAMA2_JINJA, ["<<SYS>>\\n{{ $system }}\\n<</SYS>>", "{{ .Content }} [/INST]"], "[INST]")],
    ids=["gemma", "phi3", "mistral", "llama2"])
def test_ollama_modelfile_for_gemma_phi3_mistral_and_llama2_templates(jinja, marks, stop, tmp_path):
    """Gemma's turns (BOS written by the template, `model` for the assistant, no system turn: Gemma 2's
    template raises on one), Phi-3's (Zephyr's markers, each turn ended by <|end|> rather than </s>),
    Mistral's (the system message with the last user turn) and Llama 2's (in the first, in <<SYS>>)."""
    from qlora.export import write_modelfile
    from tests.conftest import make_tokenizer

    make_tokenizer(jinja).save_pretrained(tmp_path)
    write_modelfile(tmp_path, "model-f16.gguf", tmp_path / "Modelfile")
    text = (tmp_path / "Modelfile").read_text()
    assert all(m.replace("\\n", "\n") in text for m in marks), text
    assert f'PARAMETER stop "{stop}"' in text and "SYSTEM" not in text, text


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
