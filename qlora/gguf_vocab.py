"""A tokenizer in GGUF as llama.cpp reads it: the vocabulary with each token's type, BPE merges or
SentencePiece scores, the pre-tokenizer by the name llama.cpp knows it, special ids and the chat template."""
from __future__ import annotations

import json
import re
from typing import Optional

from qlora.errors import UserError


# The splitting rules of Llama 3's and Qwen2's tokenizers (tokenizer.json's Split pattern), which llama.cpp
# knows by the names llama-bpe and qwen2; they differ in digits: up to three a piece, or one.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# OpenAI's o200k rules (gpt-oss's tokenizer), which llama.cpp knows as gpt-4o: a word's case runs split apart,
# contractions kept on the word
O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# llama.cpp drops the whitespace after each special token (rstrip) of a model whose name says Phi-3
# (general.name, any case: "phi3" or "phi-3"), as Phi-3's tokenizer does, but after these; it fails to load
# such a model whose vocabulary lacks any of them or </s>. No other model's tokens are stripped.
PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
PHI3_UNSTRIPPED = ("<unk>", "<s>", "<|endoftext|>")


def llama_cpp_name(name: str, tokenizer) -> str:
    """The model's name (general.name) under which llama.cpp treats the whitespace after special tokens as
    the tokenizer does: said to be Phi-3 where the tokenizer strips as Phi-3's does (its tokens hold
    rstrip), and not where llama.cpp would then fail to load the file or strip what the tokenizer keeps."""
    from qlora.models import say

    added = list(tokenizer.added_tokens_decoder.values())
    if not any(t.rstrip for t in added):
        phi3 = False
    else:
        vocab = tokenizer.get_vocab()
        phi3 = all(t in vocab for t in (*PHI3_UNSTRIPPED, "</s>")) and \
            sum(t.rstrip != (t.content not in PHI3_UNSTRIPPED) for t in added) < sum(t.rstrip for t in added)
    if phi3 and not PHI3_NAME.search(name):
        say(f"export: the GGUF names the model '{name} (phi3)': llama.cpp strips the whitespace after special "
            "tokens, as this tokenizer does, only for a model whose name says Phi-3")
        return f"{name} (phi3)"
    if not phi3 and PHI3_NAME.search(name):
        renamed = PHI3_NAME.sub(lambda m: m[0][:3] + " 3", name)
        say(f"export: the GGUF names the model '{renamed}', not '{name}': llama.cpp takes a model whose name "
            "says Phi-3 for one, and would strip whitespace this tokenizer keeps or not load the file")
        return renamed
    return name


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
    if splits == [O200K_SPLIT] and len(parts) == 2 and byte_level:
        return "gpt-4o"
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
    (SmolLM2, Llama 3, Qwen) with its merges, or a SentencePiece one (Llama 2, TinyLlama, Mistral, Phi-3,
    Gemma) with a score a piece."""
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
