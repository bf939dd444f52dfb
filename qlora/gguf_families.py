"""The model families GGUF export writes, and what llama.cpp assumes of each without reading it from the file:
each family's llama.cpp architecture and conventions (`Family`), and the checks that refuse a model which
would load there and compute another function (`check_gguf_arch`, before any merge). gguf_writer.py writes
the files."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

from qlora.errors import UserError


@dataclass(frozen=True)
class Family:
    """How one HF model type is written as GGUF."""

    arch: str  # the architecture llama.cpp knows the model by
    permute_qk: bool = False  # llama.cpp's llama layout interleaves each head's rotary halves; HF's holds them apart
    norm_shift: float = 0.0  # Gemma's norms scale by 1 + weight, llama.cpp's by the weight: add this to each
    swa_every: int = 0  # llama.cpp's fixed pattern: of each `swa_every` layers, all but the last slide (0: none)


FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "qwen3_moe": Family("qwen3moe"),
    "mixtral": Family("llama", permute_qk=True),  # llama.cpp's llama with experts
    "phi3": Family("phi3"),
    "phi": Family("phi2"),  # Phi-1.5 and Phi-2: layer norms with biases, attention and MLP side by side
    "olmo2": Family("olmo2"),  # norms after attention and MLP, q and k normalized across heads
    "granite": Family("granite", permute_qk=True),  # llama with scaled embeddings, residuals, attention, logits
    "gemma2": Family("gemma2", norm_shift=1.0, swa_every=2),
    "gemma3_text": Family("gemma3", norm_shift=1.0, swa_every=6),
    "gemma3": Family("gemma3", norm_shift=1.0, swa_every=6),  # with its vision tower: the language model alone
    # experts fused and gate/up interleaved in the files, attention sinks, a window on every other layer
    "gpt_oss": Family("gpt-oss", swa_every=2),
}
# the clamp of gpt-oss's SwiGLU, which llama.cpp fixes for the architecture
GPT_OSS_SWIGLU_LIMIT = 7.0
# the layer counts llama.cpp takes for Gemma's 27B, which scales attention by hidden / heads, not head_dim
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# rotary scalings written as llama.cpp reads them (longrope: Phi-3's, the only family llama.cpp reads it for)
ROPE_TYPES = ("default", "llama3", "linear", "yarn")


def text_config(config):
    """The language model's config: Gemma 3 with vision holds it as text_config."""
    return config.text_config if config.model_type == "gemma3" else config


def rope_settings(config):
    """(the rotary settings of the global-attention layers, those of the sliding-window ones or None); Gemma 3
    holds one of each, by layer type."""
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    if "full_attention" in rope:
        return rope["full_attention"], rope.get("sliding_attention")
    return rope, None


def check_gguf_arch(folder):
    """The model's config, refused unless GGUF export writes its architecture and the model holds to what
    llama.cpp assumes of that architecture without reading it from the file."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UserError(f"GGUF export supports {', '.join(FAMILIES)} models, not {config.model_type!r}; "
                        "use export.format=safetensors")
    text = text_config(config)
    glob, local = rope_settings(text)
    kind = glob.get("rope_type", "default")
    if kind not in ROPE_TYPES and not (kind == "longrope" and family.arch == "phi3"):
        raise UserError(f"GGUF export: llama.cpp does not read {kind!r} rotary scaling for {family.arch}; "
                        "use export.format=safetensors")
    if family.swa_every:
        check_layer_pattern(text, family)
    if family.arch in GEMMA_27B_LAYERS:
        check_gemma(text, family, local)
    if config.model_type == "gpt_oss" and config.swiglu_limit != GPT_OSS_SWIGLU_LIMIT:
        raise UserError(f"GGUF export: llama.cpp clamps gpt-oss's SwiGLU at {GPT_OSS_SWIGLU_LIMIT}, where this "
                        f"model has swiglu_limit={config.swiglu_limit}: use export.format=safetensors")
    if config.model_type == "phi" and config.qk_layernorm:
        raise UserError("GGUF export: llama.cpp's phi2 has no layer norm of q and k (qk_layernorm=true in this "
                        "model): use export.format=safetensors")
    if config.model_type == "qwen3_moe" and (not config.norm_topk_prob or config.mlp_only_layers
                                             or config.decoder_sparse_step != 1):
        raise UserError("GGUF export: llama.cpp assumes every layer of qwen3moe a mixture (mlp_only_layers=[], "
                        "decoder_sparse_step=1) with its top-k router weights normalized (norm_topk_prob=true); "
                        "this model differs: use export.format=safetensors")
    return config


def refuse_assumption(family: Family, what: str, key: str, value):
    """Refuse a model that differs from what llama.cpp assumes of its architecture."""
    raise UserError(f"GGUF export: llama.cpp assumes {what} of {family.arch}, where this model has "
                    f"{key}={value}; its GGUF would compute another function: use export.format=safetensors")


def check_layer_pattern(config, family: Family) -> None:
    """llama.cpp fixes which layers attend through a sliding window by the architecture (Gemma, gpt-oss): the
    last of each `swa_every` layers attends globally. A model whose layers differ is refused."""
    expected = ["full_attention" if (i + 1) % family.swa_every == 0 else "sliding_attention"
                for i in range(config.num_hidden_layers)]
    if list(getattr(config, "layer_types", expected)) != expected:
        refuse_assumption(family, f"one global-attention layer in every {family.swa_every}", "layer_types",
                          config.layer_types)


def check_gemma(config, family: Family, local) -> None:
    """llama.cpp fixes Gemma's local rotary base and attention scale by the architecture; a model that differs
    would load and compute another function, so it is refused."""
    refuse = partial(refuse_assumption, family)
    if local is not None and (local.get("rope_type", "default") != "default" or local.get("rope_theta") != 10000.0):
        refuse("a rotary base of 10000, unscaled, in the sliding-window layers",
               "rope_parameters.sliding_attention", local)
    head_dim = config.head_dim
    if config.num_hidden_layers == GEMMA_27B_LAYERS[family.arch]:
        head_dim = config.hidden_size // config.num_attention_heads
    if config.query_pre_attn_scalar != head_dim:
        refuse(f"attention scaled by 1/sqrt({head_dim})", "query_pre_attn_scalar", config.query_pre_attn_scalar)


def window_left_out(config, family: Family) -> Optional[int]:
    """The sliding window of a model whose family llama.cpp runs over the whole context (Mistral 7B v0.1 and
    Mixtral as its llama; Phi-3, whose window llama.cpp turns off), or None: its GGUF computes what the model
    does up to that many tokens of context, and otherwise past them."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    if family.swa_every or not window or getattr(config, "use_sliding_window", True) is False \
            or (types and "sliding_attention" not in types):
        return None
    return window if window < config.max_position_embeddings else None
