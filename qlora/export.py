"""`qlora export`: a run (merged first) or a merged folder, written for another runtime.

- safetensors: the merged HF folder (as `qlora merge`).
- gguf: one .gguf file written in Python with the `gguf` package (F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1
  or Q4_0), with the tokenizer, chat template and stop tokens in its metadata: no llama.cpp build to break.
- ollama: the GGUF file plus a Modelfile whose TEMPLATE, SYSTEM and stop parameters come from the
  chat template.
- nf4: the fp32 merged weights re-quantized to NF4 (double quant) and saved through bitsandbytes'
  serialization, for small deployments; its agreement with the adapter is checked too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional

from qlora.config import ExportFormat, GgufType, QLoraConfig, SaveDtype
from qlora.errors import UserError, WorkError
from qlora.merge import merge_run, output_folder
from qlora.outputs import claim_output_dir

# HF model_type -> GGUF architecture, and whether q/k rows are permuted for llama.cpp's RoPE layout
GGUF_ARCH = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
             "qwen3": ("qwen3", False)}


def export_cli(cfg: QLoraConfig) -> int:
    """The `qlora export` verb."""
    from qlora.models import say

    fmt = cfg.export.format
    if cfg.adapter:
        out = output_folder(cfg, "export")
    else:
        out = plain_output(cfg)
    if fmt is ExportFormat.safetensors:
        if not cfg.adapter:
            raise UserError("export.format=safetensors writes a run's merged model: give adapter=RUN")
        merge_run(cfg, out)
        print(out)
        return 0
    if cfg.adapter and fmt is not ExportFormat.nf4:  # before the merge, which takes minutes on large models
        from qlora.inference import adapter_base_folder

        check_gguf_arch(adapter_base_folder(cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        staged = tmp / "out"
        staged.mkdir()
        if cfg.adapter:  # merge in fp32 first: every format below starts from the merged weights
            merged = tmp / "merged"
            merge_run(replace(cfg, merge=replace(cfg.merge, dtype=SaveDtype.float32)), merged)
            shutil.copy(merged / "merge_report.json", staged / "merge_report.json")
        else:
            merged = Path(cfg.model.name_or_path).expanduser()
        if fmt is ExportFormat.nf4:
            export_nf4(cfg, merged, staged)
        else:
            gguf = staged / f"model-{cfg.export.gguf_type.value}.gguf"
            write_gguf(merged, gguf, cfg.export.gguf_type)
            if fmt is ExportFormat.ollama:
                write_modelfile(merged, gguf.name, staged / "Modelfile")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"exported {fmt.value} to {out}")
    print(out)
    return 0


def plain_output(cfg: QLoraConfig) -> Path:
    """Without adapter=, export takes a merged (or any HF) folder from model.name_or_path."""
    src = Path(cfg.model.name_or_path).expanduser()
    if not (src / "config.json").is_file():
        raise UserError("give adapter=RUN, or model.name_or_path=MERGED_FOLDER (an HF model folder)")
    return claim_output_dir(cfg)


# --------------------------------------------------------------------------------------------- GGUF

def check_gguf_arch(folder):
    """The model's config, refused unless GGUF export writes its architecture."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in GGUF_ARCH:
        raise UserError(f"GGUF export supports {', '.join(GGUF_ARCH)} models, not {config.model_type!r}; "
                        "use export.format=safetensors")
    return config


def write_gguf(folder: Path, path: Path, kind: GgufType) -> None:
    """Write an HF folder (llama, mistral, qwen2, qwen3; a byte-level or SentencePiece BPE tokenizer) as one
    GGUF file."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from qlora.models import say

    config = check_gguf_arch(folder)
    arch, permute_qk = GGUF_ARCH[config.model_type]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)  # Qwen3's head_dim is not hidden / heads
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if kind is GgufType.f32
                         else gguf.LlamaFileType[f"MOSTLY_{kind.value.upper()}"])
    add_tokenizer(writer, tokenizer, config)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tensors: Dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as shard:
            for key in shard.keys():
                tensors[key] = shard.get_tensor(key).float()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # llama.cpp reuses token_embd
    in_f16 = []  # tensors whose rows are no whole number of the type's blocks
    for key, t in tensors.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise WorkError(f"GGUF export: no GGUF name for tensor {key}")
        if permute_qk and key.endswith("self_attn.q_proj.weight"):
            t = rope_permute(t, heads)
        elif permute_qk and key.endswith("self_attn.k_proj.weight"):
            t = rope_permute(t, kv_heads)
        data = t.numpy().astype(np.float32)
        qtype = tensor_type(name, data, kind)
        if qtype is gguf.GGMLQuantizationType.F16 and kind is not GgufType.f16:
            in_f16.append(name)
        if qtype is gguf.GGMLQuantizationType.F32:  # norms and biases stay f32
            writer.add_tensor(name, data)
        elif qtype is gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    factors = llama3_rope_factors(config, head_dim)
    if factors is not None:  # Llama 3.1 and 3.2: llama.cpp divides each frequency by its factor
        writer.add_tensor(f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", factors)
    if in_f16:
        say(f"export.gguf_type={kind.value}: {len(in_f16)} tensor(s) written f16, their rows not a whole number "
            f"of the type's blocks ({', '.join(in_f16[:3])}{', ...' if len(in_f16) > 3 else ''})")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tensor_type(name: str, data, kind: GgufType):
    """The GGML type a tensor is written in: f32 for vectors (norms, biases); for the 4- and 5-bit kinds, q8_0
    for the token embeddings and the LM head (llama.cpp's own quantizer keeps the output layer at more bits
    too, and a tied head is the embeddings); f16 where a row is not a whole number of the type's blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim == 1 or kind is GgufType.f32:
        return Q.F32
    qtype = Q[kind.value.upper()]
    if kind.value.startswith(("q4", "q5")) and name.split(".")[0] in ("token_embd", "output"):
        qtype = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if data.shape[-1] % block == 0 else Q.F16


def llama3_rope_factors(config, head_dim: int):
    """Llama 3.1's rotary scaling (rope_type llama3) as GGUF holds it: a factor for each frequency, by
    which llama.cpp divides it (rope_freqs), the base frequencies over those transformers computes.
    None for a model without it."""
    import numpy as np
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (base / scaled.double()).numpy().astype(np.float32)


def rope_permute(weight, n_heads: int):
    """HF stores each head's rotary halves apart; llama.cpp interleaves them (GGUF's llama layout)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


# The splitting rules of Llama 3's and Qwen2's tokenizers (tokenizer.json's Split pattern), which llama.cpp
# knows by the names llama-bpe and qwen2; they differ in digits: up to three a piece, or one.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def llama_cpp_pre(pre: Optional[dict]) -> str:
    """The name llama.cpp knows a tokenizer's pre-tokenizer by (GGUF's tokenizer.ggml.pre): it splits the
    text by that name's rules before the merges. Its default splits runs of punctuation off the space
    before them, so that JSON such as ` {"` would be tokenized otherwise than in training."""
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if splits == [LLAMA3_SPLIT] and len(parts) == 2 and byte_level:
        return "llama-bpe"
    if splits == [QWEN2_SPLIT] and len(parts) == 2 and byte_level:
        return "qwen2"
    if byte_level and byte_level[0].get("use_regex", True) and len(parts) == 1:
        return "gpt-2"  # GPT-2's rules, as SmolLM2's tokenizer converted from its GGUF file has them
    if byte_level and byte_level[0].get("use_regex", True) and len(parts) == 2 and \
            any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
        return "smollm"  # GPT-2's, each digit apart (SmolLM's own tokenizer.json)
    from qlora.models import say

    say("export: llama.cpp does not know this tokenizer's pre-tokenizer by name, so it splits text by its "
        "default rules, which may tokenize some text otherwise than training did")
    return "default"


def add_tokenizer(writer, tokenizer, config) -> None:
    """The vocabulary, special ids and chat template, as llama.cpp reads them: a byte-level BPE tokenizer
    (SmolLM2, Llama 3, Qwen) with its merges, or a SentencePiece one (Llama 2, TinyLlama, Mistral) with a
    score a piece."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        sentencepiece_vocab(writer, spec)
    elif model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer") or {}):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(llama_cpp_pre(spec.get("pre_tokenizer")))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    else:
        raise UserError(f"GGUF export writes byte-level BPE and SentencePiece BPE tokenizers, not this "
                        f"{model.get('type')} one; use export.format=safetensors for this model")
    vocab = model["vocab"]
    size = max(config.vocab_size, max(vocab.values()) + 1, len(tokenizer))
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", tok) and model.get("byte_fallback") \
            else gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if tokenizer.unk_token_id is not None and model.get("byte_fallback"):
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model.get("byte_fallback"):
        merged = {"".join(m.split(" ") if isinstance(m, str) else m): -rank
                  for rank, m in reversed(list(enumerate(model.get("merges", []))))}
        # a piece's score is its first merge's rank, negated: llama.cpp joins the best-scored pair first, as
        # the merges go in order; pieces no merge makes (characters, bytes, specials) are never joined into
        writer.add_token_scores([float(merged.get(t, -1e9)) for t in tokens])
    for kind, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(False)  # chat templates write BOS themselves where they need it
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def sentencepiece_vocab(writer, spec: dict) -> None:
    """A SentencePiece tokenizer's settings in GGUF: llama.cpp's own SentencePiece model, which puts a space
    before the text where the tokenizer does (its normalizer prepends '▁', or its Metaspace does)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    prepends = '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)
    writer.add_tokenizer_model("llama")
    writer.add_add_space_prefix(prepends)


# ------------------------------------------------------------------------------------------- Ollama

# Go templates for the chat formats Ollama users meet most; chosen by the markers of the Jinja template.
OLLAMA_TEMPLATES = {
    "<|im_start|>": ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                     "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                     "<|im_start|>assistant\n", ["<|im_end|>", "<|im_start|>"]),
    "<|start_header_id|>": ("<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n"
                            "{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>"
                            "{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n", ["<|eot_id|>"]),
    "<|assistant|>": ("{{- if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}{{- range .Messages }}"
                      "<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n", ["</s>", "<|user|>"]),
}


def default_system(tokenizer) -> Optional[str]:
    """The system message a template inserts when the conversation has none (SmolLM2's does)."""
    user = [{"role": "user", "content": "QLORA_PROBE_USER"}]
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    probed = tokenizer.apply_chat_template([{"role": "system", "content": "QLORA_PROBE_SYSTEM"}] + user,
                                           tokenize=False)
    before, _, after = probed.partition("QLORA_PROBE_SYSTEM")
    # without a system message the template rendered `before + DEFAULT + after`
    if after and plain.startswith(before) and plain.endswith(after) and len(plain) > len(before) + len(after):
        return plain[len(before):len(plain) - len(after)]
    return None


def write_modelfile(folder: Path, gguf_name: str, path: Path) -> None:
    from transformers import AutoTokenizer

    from qlora.models import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = tokenizer.chat_template or ""
    match = next((m for m in OLLAMA_TEMPLATES if m in template), None)
    if match is None:
        raise UserError("export.format=ollama knows ChatML, Llama-3 and Zephyr chat templates; this model's "
                        "template is none of them: use export.format=gguf and write the Modelfile TEMPLATE by hand")
    go_template, stops = OLLAMA_TEMPLATES[match]
    stops = sorted(set(stops) | {tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)})
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template}"""']
    system = default_system(tokenizer)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- NF4

def export_nf4(cfg: QLoraConfig, merged: Path, out: Path) -> None:
    """Re-quantize the fp32 merged weights to NF4 and save them with bitsandbytes' serialization."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora.models import pick_device

    device = pick_device()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(merged, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": 0 if device == "cuda" else "cpu"})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(merged).save_pretrained(out)
    for name in ("generation_config.json",):
        if (merged / name).is_file():
            shutil.copy(merged / name, out / name)
    if cfg.adapter:
        from qlora.inference import load_for_inference
        from qlora.merge import check_texts, compare_logits

        loaded = load_for_inference(cfg, exact=True)
        reloaded = AutoModelForCausalLM.from_pretrained(out, device_map={"": 0 if device == "cuda" else "cpu"})
        result = compare_logits(loaded.model, reloaded, loaded.tokenizer,
                                check_texts(cfg, loaded.tokenizer, cfg.merge.check_prompts))
        result["saved_dtype"] = "nf4"
        (out / "nf4_report.json").write_text(json.dumps(result, indent=2) + "\n")
        if result["top1_agreement"] < cfg.merge.min_top1_agreement_nf4:
            raise WorkError(f"the NF4 export agrees with the adapter model on {result['top1_agreement']:.2%} of "
                            f"tokens, below merge.min_top1_agreement_nf4={cfg.merge.min_top1_agreement_nf4}")
