"""Export: GGUF files that transformers' own GGUF loader reads back, a Modelfile, an NF4 folder."""
import json

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
    import gguf

    run, _ = tiny_run
    out = tmp_path / "ollama"
    assert main(["export", f"adapter={run.run_dir}", "export.format=ollama", f"output_dir={out}"]) == 0
    text = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in text and (out / "model-f16.gguf").is_file()
    assert '<|im_start|>{{ .Role }}' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a tiny test model."""' in text  # the template's default system message
    assert json.loads((out / "merge_report.json").read_text())["top1_agreement"] == 1.0
    # the model named after the run, not after the merge's temporary folder
    assert gguf.GGUFReader(str(out / "model-f16.gguf")).fields["general.name"].contents() == run.run_dir.name


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


def test_a_k_quant_without_llama_cpp_is_refused_before_anything(tiny_merged, tmp_path, capsys, monkeypatch):
    """q4_k_m and the other K-quants are llama.cpp's to quantize: without llama-cpp-python the export stops at
    once, naming the key and the way out, and writes nothing."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a))
    out = tmp_path / "gguf"
    assert main(["export", f"model.name_or_path={tiny_merged}", "export.format=ollama", "export.gguf_type=q4_k_m",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "export.gguf_type=q4_k_m: llama.cpp quantizes the K-quant types; pip install 'qlora[llama-cpp]'" in err, err
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
    from qlora.gguf_types import tensor_type

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

    from qlora.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT, llama_cpp_pre

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


# gpt-oss's harmony format, shortened: turns in channels, each ended by <|end|> as Phi-3's are
HARMONY_JINJA = ("{% for m in messages %}<|start|>{{ m['role'] }}<|channel|>final<|message|>{{ m['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")


def test_ollama_export_of_gpt_oss_harmony_format_is_refused_before_the_merge(tiny_run, tmp_path, capsys):
    """gpt-oss's harmony template shares Phi-3's <|end|>, which chose Phi-3's Go template for it: Ollama would
    have prompted the model in another format. It is refused, before the merge, with what to do instead."""
    import shutil

    run, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    config = json.loads((copy / "adapter" / "tokenizer_config.json").read_text())
    config["chat_template"] = HARMONY_JINJA
    (copy / "adapter" / "tokenizer_config.json").write_text(json.dumps(config))
    (copy / "adapter" / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["export", f"adapter={copy}", "export.format=ollama", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "this model's template is none of them: use export.format=gguf" in err and "merging" not in err, err
    assert not (tmp_path / "o").exists()
