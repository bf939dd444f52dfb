"""GGUF files run by llama.cpp itself (llama-cpp-python), where the other GGUF tests read them back through
transformers' GGUF reader, which takes llama.cpp's conventions from the same `gguf` package as the writer:
llama.cpp's tokens equal those of the tokenizer training used, and its logits the model's, for each family
the export writes, each rotary scaling, each GGUF type and the real SmolLM2. Skipped where llama-cpp-python
is not installed (.ci/run builds it)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora.cli import main
from tests.conftest import CORPUS, make_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

# the second text (tens of tokens) is longer than the sliding windows below (16), so that windows are exercised
TEXTS = ["What is the capital of France? Paris.", " ".join(CORPUS[:2])]
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=None)),  # v0.2 on (v0.1's window: below)
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=128)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)),
    # six layers: the sixth is Gemma 3's global one
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                        num_hidden_layers=6)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "phi": ("PhiConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, residual_multiplier=0.22,  # Granite 3's
                                      attention_multiplier=0.0078125, logits_scaling=8.0)),
    # gpt-oss-20b's rotary scaling (YaRN, 32x) and layer pattern; the window (16) narrower than the second text
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16)),
    # rotary scalings: Llama 3.1's per-frequency factors, YaRN, Gemma 3's linear scaling of its global layers
    "llama3.1 rotary": ("LlamaConfig", dict(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2 yarn": ("Qwen2Config", dict(max_position_embeddings=512, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1e6})),
    "gemma3 linear": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                               num_hidden_layers=6, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}


def tiny_model(folder, config_class: str, own: dict, tokenizer=None):
    """A tiny random model of a family with the tiny tokenizer (or the one given), its norms and biases drawn
    away from their initial values (1 or 0) so that one written wrong shows in the logits. The folder is named
    "model": llama.cpp expects of a model named after Phi-3 the special tokens of Phi-3's own tokenizer, which
    the tiny one lacks."""
    import transformers

    path = folder / "model"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**{**COMMON, **own}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
            elif name.endswith((".bias", "_bias")):  # gpt-oss's experts: gate_up_proj_bias
                p.normal_(0, 0.1)
            elif name.endswith(".sinks"):  # gpt-oss's attention sinks
                p.normal_(0, 1.0)
    model.save_pretrained(path)
    (tokenizer or make_tokenizer()).save_pretrained(path)
    return path


def export(model, out, kind: str = "f32"):
    assert main(["export", f"model.name_or_path={model}", "export.format=gguf", f"export.gguf_type={kind}",
                 f"output_dir={out}"]) == 0
    return out / f"model-{kind}.gguf"


# loads a GGUF and runs two tokens through it, in a process of its own (llama_cpp_model's probe)
PROBE = """import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=32, n_threads=1, verbose=False)
llm.eval([0, 1])"""


def llama_cpp_model(path):
    """llama.cpp's model on the file, keys and values cached in f32 (its default f16 rounds them). llama.cpp
    aborts the process on a file it cannot run (a GGML_ASSERT), which would end the whole test session:
    the file is first loaded and run in a process of its own, and such an abort fails this test alone."""
    probe = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True)
    if probe.returncode:
        pytest.fail(f"llama.cpp could not load and run {Path(path).name} (exit {probe.returncode}):\n"
                    f"{probe.stderr[-3000:]}")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def logits_by_both(model_dir, gguf_path, texts=TEXTS):
    """(llama.cpp's logits, transformers' logits) of each text, tokenized by the model's own tokenizer, and
    whether llama.cpp tokenized each text the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = llama_cpp_model(gguf_path)
    pairs, same_tokens = [], []
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        same_tokens.append(llm.tokenize(text.encode(), add_bos=False, special=True) == ids)
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].numpy()
        pairs.append((np.array(llm.scores[:len(ids)]), want))
    return pairs, same_tokens


def agreement(pairs):
    """(max |logit difference|, top-1 agreement, mean KL(transformers || llama.cpp)) over all positions."""
    got, want = np.concatenate([g for g, _ in pairs]), np.concatenate([w for _, w in pairs])
    log_p = torch.log_softmax(torch.from_numpy(want).double(), -1)
    log_q = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return float(np.abs(got - want).max()), float((got.argmax(-1) == want.argmax(-1)).mean()), kl


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_computes_what_the_model_does(family, tmp_path):
    config_class, own = FAMILIES[family]
    model = tiny_model(tmp_path, config_class, own)
    pairs, same_tokens = logits_by_both(model, export(model, tmp_path / "gguf"))
    max_diff, top1, kl = agreement(pairs)
    assert all(same_tokens)
    # measured: Gemma's logits up to 4e-4 apart (its GELU, approximated in llama.cpp; not traced further),
    # the others' up to 2e-4
    assert max_diff < 1e-3 and top1 == 1.0 and kl < 1e-7, (max_diff, top1, kl)


def test_gemma3_with_its_vision_tower_runs_as_its_language_model(tmp_path):
    """Gemma 3 from 4B up: the GGUF holds the language model, which llama.cpp runs on text as the whole model
    does."""
    from tests.conftest import make_tiny_gemma3_with_vision

    model = make_tiny_gemma3_with_vision(tmp_path / "model", head_dim=256)
    pairs, same_tokens = logits_by_both(model, export(model, tmp_path / "gguf"))
    max_diff, top1, kl = agreement(pairs)
    assert all(same_tokens) and max_diff < 1e-3 and top1 == 1.0, (max_diff, top1, kl)


@pytest.mark.parametrize("kind", ["f16", "q4_0"])
def test_gpt_oss_runs_in_llama_cpp_in_16_and_4_bits(kind, tmp_path):
    """gpt-oss's per-expert biases (a row an expert) stay f32, which llama.cpp adds them in (written f16 or
    quantized, llama.cpp aborted on the first token)."""
    _, most, top1, _ = next(k for k in KINDS if k[0] == kind)
    model = tiny_model(tmp_path, *FAMILIES["gpt_oss"])
    pairs, same_tokens = logits_by_both(model, export(model, tmp_path / "gguf", kind))
    max_diff, agree, _ = agreement(pairs)
    assert all(same_tokens) and max_diff < most and agree >= top1, (max_diff, agree)


def test_gpt_oss_experts_from_openais_mxfp4_stay_mxfp4_exactly(tmp_path, monkeypatch, capsys):
    """gpt-oss's experts as OpenAI ships them (MXFP4), its folder exported as it is, go into a quantized
    GGUF in MXFP4, which holds their values exactly in a quarter of q8_0's bits; the rest is q8_0."""
    import gguf
    from safetensors.torch import load_file

    from tests.integration.test_prequantized import tiny_gpt_oss_in_mxfp4

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    base, _ = tiny_gpt_oss_in_mxfp4(tmp_path / "gpt-oss")
    path = export(base, tmp_path / "gguf", "q8_0")
    assert "the 6 expert tensors written in MXFP4, which holds their values exactly" in capsys.readouterr().err
    (converted,) = (tmp_path / "cache" / "mxfp4").iterdir()  # its bf16 conversion, which transformers loads
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert {t.tensor_type.name for n, t in tensors.items() if "_exps.weight" in n} == {"MXFP4"}
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    up = gguf.quants.dequantize(tensors["blk.0.ffn_up_exps.weight"].data, gguf.GGMLQuantizationType.MXFP4)
    fused = load_file(str(converted / "model.safetensors"))["model.layers.0.mlp.experts.gate_up_proj"]
    assert np.array_equal(up.reshape(4, 64, 64), fused.float().transpose(1, 2)[:, 1::2].numpy())
    pairs, same_tokens = logits_by_both(converted, path)
    max_diff, top1, kl = agreement(pairs)
    assert all(same_tokens) and max_diff < 0.02 and top1 >= 0.9, (max_diff, top1, kl)


def image_embeddings(gguf_path, mmproj_path, image: np.ndarray) -> np.ndarray:
    """llama.cpp's embeddings of an RGB image (height x width x 3, uint8) through an mmproj file, as its
    multimodal library (libmtmd) hands them to the language model: (image tokens x hidden)."""
    import ctypes

    from llama_cpp import mtmd_cpp as mtmd

    llm = llama_cpp_model(gguf_path)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup = False, 2, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
    assert ctx, f"llama.cpp did not load {mmproj_path}"
    pixels = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
    bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], pixels)
    chunks = mtmd.mtmd_input_chunks_init()
    text = mtmd.mtmd_input_text()
    marker = mtmd.mtmd_default_marker()  # where the image goes in the prompt
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    try:
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        images = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        (chunk,) = [c for c in images if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
        n, hidden = mtmd.mtmd_input_chunk_get_n_tokens(chunk), llm.n_embd()
        return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * hidden,)).reshape(n, hidden).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)


# the most |difference| of llama.cpp's image embeddings from transformers' (of a few units): measured 8e-4 with
# the mmproj in f32, 2.2e-3 in f16
MMPROJ_KINDS = [("f32", "f32", 5e-3), ("q8_0", "f16", 1e-2)]


@pytest.mark.parametrize("kind,mmproj_kind,most", MMPROJ_KINDS, ids=[k[0] for k in MMPROJ_KINDS])
def test_gemma3_reads_images_through_its_mmproj_file_as_the_model_does(kind, mmproj_kind, most, tmp_path):
    """Gemma 3's vision tower and projector, written as llama.cpp's mmproj file beside the language model
    (f16 unless the model is f32), turn an image into the embeddings transformers gives it: the image of the
    model's own size (no resampling), normalized by the base's image processor."""
    from transformers import Gemma3ForConditionalGeneration

    from tests.conftest import GEMMA3_TEST_MEAN, GEMMA3_TEST_STD, make_tiny_gemma3_with_vision

    model = make_tiny_gemma3_with_vision(tmp_path / "model", head_dim=256)
    path = export(model, tmp_path / "gguf", kind)
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    got = image_embeddings(path, path.with_name(f"mmproj-{mmproj_kind}.gguf"), image)
    ref = Gemma3ForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    pixels = (pixels - torch.tensor(GEMMA3_TEST_MEAN)[:, None, None]) / torch.tensor(GEMMA3_TEST_STD)[:, None, None]
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=pixels)
    want = getattr(want, "pooler_output", want)[0].numpy()
    assert got.shape == want.shape == (4, 64)  # mm_tokens_per_image of the text's hidden size
    assert np.abs(got - want).max() < most, np.abs(got - want).max()


@pytest.mark.parametrize("config_class,own", [("Phi3Config", dict(pad_token_id=0, sliding_window=16)),
                                              ("MistralConfig", dict(sliding_window=16))], ids=["phi3", "mistral"])
def test_a_sliding_window_llama_cpp_runs_without_is_said(config_class, own, tmp_path, capsys):
    """llama.cpp turns Phi-3's sliding window off and runs Mistral (v0.1 had a window of 4096) as its llama,
    which has none: the export says so, and the file computes the model's logits within the window and
    others past it."""
    model = tiny_model(tmp_path, config_class, own)
    path = export(model, tmp_path / "gguf")
    assert "without this model's sliding window of 16 tokens" in capsys.readouterr().err
    (short, long), _ = logits_by_both(model, path)
    assert len(short[0]) <= 16 and agreement([short])[0] < 1e-3
    assert agreement([(long[0][:16], long[1][:16])])[0] < 1e-3
    assert np.abs(long[0][16:] - long[1][16:]).max() > 1e-2


# (GGUF type, most |logit difference|, least top-1 agreement, most KL) against the fp32 model: llama.cpp
# multiplies 4-, 5- and 8-bit weights by activations rounded to 8 bits (measured: f16 1.6e-4, q8_0 4.3e-3,
# q4_0 0.032 at most, on logits of up to ~0.6)
KINDS = [("f16", 1e-3, 1.0, 1e-8), ("bf16", 5e-3, 1.0, 2e-7), ("q8_0", 0.02, 0.9, 2e-6),
         ("q5_1", 0.05, 0.85, 1e-5), ("q5_0", 0.05, 0.85, 1e-5), ("q4_1", 0.1, 0.8, 3e-5), ("q4_0", 0.1, 0.8, 3e-5)]


@pytest.mark.parametrize("kind,most,top1,most_kl", KINDS, ids=[k[0] for k in KINDS])
def test_each_gguf_type_runs_close_to_the_model(kind, most, top1, most_kl, tmp_path):
    model = tiny_model(tmp_path, "LlamaConfig", {})
    pairs, _ = logits_by_both(model, export(model, tmp_path / "gguf", kind))
    stats = agreement(pairs)
    print(kind, stats)
    assert stats[0] < most and stats[1] >= top1 and stats[2] < most_kl, stats


# K-quants as llama.cpp's quantizer mixes them (a 256-wide model: K-quant blocks are 256 weights; narrower
# rows fall back to other types), with the bounds of 4-, 5- and 6-bit types above
K_KINDS = [("q6_k", {"Q6_K"}, 0.1, 0.8, 1e-4), ("q5_k_m", {"Q5_K", "Q6_K"}, 0.15, 0.8, 3e-4),
           ("q4_k_m", {"Q4_K", "Q6_K"}, 0.2, 0.6, 1e-3)]


@pytest.mark.parametrize("kind,types,most,top1,most_kl", K_KINDS, ids=[k[0] for k in K_KINDS])
def test_k_quants_are_quantized_by_llama_cpp(kind, types, most, top1, most_kl, tmp_path):
    """export.gguf_type=q4_k_m and the other K-quants: the writer's f16 file, quantized by llama.cpp (the gguf
    package has no K-quantizer) and removed; the weights in the K-quant types, the logits close."""
    import gguf

    model = tiny_model(tmp_path, "LlamaConfig", dict(hidden_size=256, intermediate_size=512))
    path = export(model, tmp_path / "gguf", kind)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors} == types | {"F32"}
    stats = agreement(logits_by_both(model, path)[0])
    assert stats[0] < most and stats[1] >= top1 and stats[2] < most_kl, stats


# text that pre-tokenizers split differently: JSON after a space, digits, contractions, runs of spaces and
# newlines, letters beyond ASCII
TOKEN_TEXTS = ['Maria is 34 years old. {"name": "Maria", "age": 34, "city": "Lisbon"}',
               "It's 1234567 km -- isn't it?\n\n  Two  spaces,\ttab; Ünïcödé: ü, 東京, 🙂!",
               "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.",
               "getHTTPResponse isn't JSONData's; a/b\n/c"]


def byte_level_tokenizer(kind: str):
    """A byte-level BPE tokenizer with the pre-tokenizer of Llama 3, Qwen2, gpt-oss, SmolLM2 or GPT-2, as the tokenizers
    library writes each into tokenizer.json, learned on the tiny tokenizer's lines and TOKEN_TEXTS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qlora.gguf_vocab import LLAMA3_SPLIT, O200K_SPLIT, QWEN2_SPLIT
    from tests.conftest import CHATML, SPECIALS

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = {
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level]),
        "gpt-4o": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(O200K_SPLIT), "isolated"), byte_level]),
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False)}[kind]
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((CORPUS + TOKEN_TEXTS) * 20, trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>", chat_template=CHATML)


@pytest.mark.parametrize("kind", ["llama-bpe", "qwen2", "gpt-4o", "smollm", "gpt-2"])
def test_llama_cpp_tokenizes_as_the_tokenizer_does(kind, tmp_path):
    """Each byte-level pre-tokenizer the export names: llama.cpp splits the text by that name's rules, and its
    tokens are the tokenizer's, special tokens included."""
    import gguf

    model = tiny_model(tmp_path, "LlamaConfig", {}, tokenizer=byte_level_tokenizer(kind))
    path = export(model, tmp_path / "gguf")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == kind
    pairs, same_tokens = logits_by_both(model, path, TOKEN_TEXTS)
    assert all(same_tokens), same_tokens
    assert agreement(pairs)[1] == 1.0


def test_llama_cpp_tokenizes_as_a_sentencepiece_tokenizer_does(tmp_path):
    """TinyLlama's and Mistral's kind of tokenizer, written as llama.cpp's own with a score a piece: llama.cpp
    joins the pieces to the tokenizer's tokens, a space put before the text and bytes for "ü" and the rest
    included."""
    from tests.integration.test_export import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer()
    model = tiny_model(tmp_path, "LlamaConfig", dict(vocab_size=len(tok)), tokenizer=tok)
    texts = TEXTS + ["Ünïcödé: ü is not in the vocabulary, so its bytes are", "東京 🙂"]
    pairs, same_tokens = logits_by_both(model, export(model, tmp_path / "gguf"), texts)
    assert all(same_tokens), same_tokens
    assert agreement(pairs)[1] == 1.0


def phi3_tokenizer():
    """The SentencePiece tokenizer with Phi-3's chat tokens, each of which, and </s>, strips the whitespace after
    it (rstrip) as Phi-3's do; <unk>, <s> and <|endoftext|> do not."""
    import json

    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.integration.test_export import sentencepiece_tokenizer

    spec = json.loads(sentencepiece_tokenizer().backend_tokenizer.to_str())
    for added in spec["added_tokens"]:
        added["rstrip"] = added["content"] == "</s>"
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)] + [
        AddedToken(t, special=True, normalized=False, rstrip=True) for t in ("<|user|>", "<|assistant|>", "<|end|>")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


def test_llama_cpp_strips_whitespace_after_special_tokens_as_phi3s_tokenizer_does(tmp_path, capsys):
    """llama.cpp drops the whitespace after special tokens only for a model whose name says Phi-3. A tokenizer
    that does so, as Phi-3's, gets "(phi3)" after its name, and its chat turns tokenize alike in llama.cpp."""
    import gguf

    tok = phi3_tokenizer()
    model = tiny_model(tmp_path, "LlamaConfig", dict(vocab_size=len(tok)), tokenizer=tok)
    path = export(model, tmp_path / "gguf")
    assert "the GGUF names the model 'model (phi3)'" in capsys.readouterr().err
    assert gguf.GGUFReader(str(path)).fields["general.name"].contents() == "model (phi3)"
    texts = ["<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n Paris.<|end|>\n",
             "<|endoftext|> kept</s>  stripped<s> kept"]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    assert ids[0][1] != ids[1][1]  # (the whitespace after <|user|> gone, after <|endoftext|> kept)
    llm = llama_cpp_model(path)
    assert [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == ids


def test_a_model_named_after_phi3_without_its_tokens_is_renamed_so_that_llama_cpp_loads_it(tmp_path, capsys):
    """A run or folder named after Phi-3 (any case) whose tokenizer lacks Phi-3's tokens: llama.cpp would fail
    to load it under that name, so the GGUF's name says "Phi 3"."""
    import gguf

    model = tiny_model(tmp_path, "LlamaConfig", {}).rename(tmp_path / "my-Phi3-run")
    path = export(model, tmp_path / "gguf")
    assert "the GGUF names the model 'my-Phi 3-run', not 'my-Phi3-run'" in capsys.readouterr().err
    assert gguf.GGUFReader(str(path)).fields["general.name"].contents() == "my-Phi 3-run"
    pairs, same_tokens = logits_by_both(model, path)
    assert all(same_tokens) and agreement(pairs)[1] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kind,top1,most_kl", [("f16", 0.99, 1e-4), ("q8_0", 0.95, 0.02)])
def test_the_real_smollm2_runs_in_llama_cpp_as_in_transformers(kind, top1, most_kl, tmp_path):
    """The built-in SmolLM2-135M-Instruct on the demo's held-out conversations as its chat template writes them:
    llama.cpp's tokens are the tokenizer's (the digits apart, ` {"` whole, the ChatML markers special), and
    its next-token choices the model's (measured: f16 100% of 328 positions, KL 9e-6; q8_0 98.5%, KL 0.006)."""
    import json

    from transformers import AutoTokenizer

    from qlora.config import DEMO_DIR
    from qlora.models import resolve_model

    model = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in (DEMO_DIR / "people_eval.jsonl").read_text().splitlines()[:4]]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    pairs, same_tokens = logits_by_both(model, export(model, tmp_path / "gguf", kind), texts)
    max_diff, agree, kl = agreement(pairs)
    print(kind, max_diff, agree, kl)
    assert all(same_tokens), same_tokens
    assert agree >= top1 and kl < most_kl, (max_diff, agree, kl)


def test_a_file_llama_cpp_cannot_run_fails_its_test_alone(tmp_path):
    """llama_cpp_model tries the file in a process of its own first: a failure there (an abort would end the
    session otherwise) fails the test that asked, with llama.cpp's words."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64)
    with pytest.raises(pytest.fail.Exception, match="llama.cpp could not load and run broken.gguf"):
        llama_cpp_model(broken)
