"""GGUF files as llama.cpp reads them, written in Python with the `gguf` package: each family's settings and
its tensors under llama.cpp's names. The families and what llama.cpp assumes of them are gguf_families.py's;
the tokenizer, chat template and stop tokens gguf_vocab.py's; the type each tensor is written in (and the
K-quants, which llama.cpp's quantizer makes) gguf_types.py's."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from qlora.config import GgufType
from qlora.errors import WorkError
from qlora.gguf_families import FAMILIES, Family, check_gguf_arch, rope_settings, text_config, window_left_out
from qlora.gguf_types import K_QUANTS, llama_cpp_quantize, tensor_type
from qlora.gguf_vocab import add_tokenizer, llama_cpp_name

# the GGUF types that are floats: gpt-oss's experts are written in them as asked, in MXFP4 under the others
FLOAT_TYPES = (GgufType.f32, GgufType.f16, GgufType.bf16)


def write_gguf(folder: Path, path: Path, kind: GgufType, name: Optional[str] = None) -> None:
    """Write an HF folder (see FAMILIES; a byte-level or SentencePiece BPE tokenizer) as one GGUF file, the
    model named `name` (general.name, which llama.cpp's front ends show; the folder's name by default). A
    K-quant is written f16 beside it first (2 bytes a weight on disk, for the time it takes), then quantized
    by llama.cpp."""
    if kind in K_QUANTS:
        f16 = path.with_name(path.name + ".f16")
        try:
            write_gguf(folder, f16, GgufType.f16, name)
            llama_cpp_quantize(f16, path, kind)
        finally:
            f16.unlink(missing_ok=True)
        return
    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    from qlora.models import say

    full = check_gguf_arch(folder)
    family, config = FAMILIES[full.model_type], text_config(full)
    window = window_left_out(config, family)
    if window:
        say(f"export: llama.cpp runs {family.arch} over the whole context, without this model's sliding window "
            f"of {window} tokens: past {window} tokens of context its answers differ from the model's")
    # each tensor goes to a temporary file as it is added (on disk past 256 MB), so that memory holds one
    # tensor at a time, not the whole model in fp32
    writer = gguf.GGUFWriter(str(path), family.arch, use_temp_file=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    writer.add_name(llama_cpp_name(name or folder.name, tokenizer))
    head_dim = add_settings(writer, config, family)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if kind is GgufType.f32
                         else gguf.LlamaFileType[f"MOSTLY_{kind.value.upper()}"])
    add_tokenizer(writer, tokenizer, config)

    in_f16, in_mxfp4 = [], 0  # tensors whose rows are no whole number of the type's blocks; experts in MXFP4
    for name, data in gguf_tensors(folder, config, family):
        qtype = tensor_type(name, data, kind)
        exact = mxfp4_if_exact(data) if family.arch == "gpt-oss" and "_exps." in name and data.ndim == 3 \
            and kind not in FLOAT_TYPES else None
        if exact is not None:
            writer.add_tensor(name, exact, raw_shape=exact.shape, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
            in_mxfp4 += 1
            continue
        if qtype is gguf.GGMLQuantizationType.F16 and kind is not GgufType.f16:
            in_f16.append(name)
        if qtype is gguf.GGMLQuantizationType.F32:  # norms and biases stay f32
            writer.add_tensor(name, data)
        elif qtype is gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    for name, data in rope_tensors(config, head_dim).items():
        writer.add_tensor(name, data)
    if in_f16:
        say(f"export.gguf_type={kind.value}: {len(in_f16)} tensor(s) written f16, their rows not a whole number "
            f"of the type's blocks ({', '.join(in_f16[:3])}{', ...' if len(in_f16) > 3 else ''})")
    if in_mxfp4:
        say(f"export.gguf_type={kind.value}: the {in_mxfp4} expert tensors written in MXFP4, which holds their "
            "values exactly (gpt-oss's experts as OpenAI ships them, which training leaves as they are)")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_settings(writer, config, family: Family) -> int:
    """The model's sizes, rotary and attention settings under the family's GGUF keys; returns the head size."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)  # Qwen3's and Gemma's head_dim is not hidden / heads
    writer.add_value_length(head_dim)
    if hasattr(config, "rms_norm_eps"):
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    else:  # Phi's layer norms
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    rope, _ = rope_settings(config)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or config.max_position_embeddings / rope["factor"]))
    if family.arch == "phi3":  # llama.cpp takes the long factors beyond the original context
        original = rope.get("original_max_position_embeddings") or \
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(config.sliding_window or 0)  # 0: none (Phi-4)
        if kind == "longrope":
            writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))
    if family.arch == "granite":
        writer.add_embedding_scale(float(config.embedding_multiplier))
        writer.add_residual_scale(float(config.residual_multiplier))
        writer.add_attention_scale(float(config.attention_multiplier))
        writer.add_logit_scale(float(config.logits_scaling))  # llama.cpp divides the logits by it, as transformers
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        elif family.arch == "gpt-oss":  # every layer a mixture of intermediate_size experts
            writer.add_expert_feed_forward_length(config.intermediate_size)
    if family.swa_every:
        writer.add_sliding_window(config.sliding_window)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None):
                getattr(writer, f"add_{key}")(float(getattr(config, key)))
    return head_dim


def gguf_tensors(folder: Path, config, family: Family):
    """The folder's weights, one (llama.cpp's name, fp32 array) at a time, in llama.cpp's layout: a mixture's
    experts, which the files hold one apart from another, stacked into one 3-D tensor a layer and product."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from qlora.models import say, weight_files

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch.upper().replace("-", "_")], config.num_hidden_layers)
    n_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    experts, left_out = {}, 0  # a stacked tensor's experts read so far, by index
    files = weight_files(str(folder))
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as shard:
            total += len(shard.keys())
    bar = tqdm(total=total, desc="writing GGUF", unit="tensor")  # quantizing a 7B model takes minutes
    for f in files:
        with safe_open(str(f), framework="pt") as shard:
            for key in shard.keys():
                bar.update()
                hf_key = language_model_key(key)
                if hf_key is None:
                    left_out += 1
                    continue
                if hf_key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp reuses token_embd
                expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", hf_key)
                if expert:  # model.layers.0.mlp.experts.3.gate_proj.weight -> ...experts.gate_proj.weight, [3]
                    stacked = f"{expert[1]}.{expert[3]}.weight"
                    experts.setdefault(stacked, {})[int(expert[2])] = read_tensor(f, key)
                    if len(experts[stacked]) == n_experts:
                        by_index = experts.pop(stacked)
                        t = torch.stack([by_index[i] for i in range(n_experts)])
                        yield gguf_name(names, stacked), t.numpy().astype(np.float32)
                    continue
                if family.arch == "gpt-oss" and ".mlp.experts." in hf_key:
                    for name, t in gpt_oss_experts(hf_key, read_tensor(f, key)):
                        yield gguf_name(names, name), t.numpy().astype(np.float32)
                    continue
                if hf_key.endswith(".sinks"):  # gpt-oss's attention sinks: a bare parameter
                    hf_key += ".weight"
                t = read_tensor(f, key)
                if family.permute_qk and hf_key.endswith("self_attn.q_proj.weight"):
                    t = rope_permute(t, config.num_attention_heads)
                elif family.permute_qk and hf_key.endswith("self_attn.k_proj.weight"):
                    t = rope_permute(t, config.num_key_value_heads)
                if family.norm_shift and hf_key.endswith("norm.weight"):
                    t = t + family.norm_shift
                yield gguf_name(names, hf_key), t.numpy().astype(np.float32)
    bar.close()
    if experts:
        raise WorkError(f"GGUF export: {next(iter(experts))} has {len(next(iter(experts.values())))} of the "
                        f"model's {n_experts} experts in the files")
    if left_out:
        say(f"export: the GGUF holds the language model; the {left_out} tensors of the vision tower and its "
            "projector are not in it (llama.cpp reads those from a separate mmproj file)")


def mxfp4_if_exact(data):
    """A tensor in MXFP4 where that holds every value exactly, else None. gpt-oss's experts are such when they
    come from OpenAI's MXFP4 checkpoint (prequantized.py) and no LoRA changed them: then MXFP4 writes them
    exactly in a quarter of q8_0's bits."""
    import gguf
    import numpy as np

    if data.shape[-1] % 32:
        return None
    q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.MXFP4)
    return q if np.array_equal(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.MXFP4), data) else None


def gpt_oss_experts(key: str, t):
    """gpt-oss's fused expert tensors as llama.cpp holds them: gate_up_proj (experts, hidden, 2 x intermediate,
    gate and up interleaved) as ffn_gate_exps and ffn_up_exps of (experts, intermediate, hidden), down_proj
    transposed likewise; their biases split the same way."""
    stem = key.rsplit(".", 1)[0]  # model.layers.N.mlp.experts
    if key.endswith("gate_up_proj_bias"):
        return [(f"{stem}.gate_proj.bias", t[..., 0::2]), (f"{stem}.up_proj.bias", t[..., 1::2])]
    if key.endswith("gate_up_proj"):
        t = t.transpose(-1, -2)
        return [(f"{stem}.gate_proj.weight", t[:, 0::2]), (f"{stem}.up_proj.weight", t[:, 1::2])]
    if key.endswith("down_proj_bias"):
        return [(f"{stem}.down_proj.bias", t)]
    return [(f"{stem}.down_proj.weight", t.transpose(-1, -2))]


def read_tensor(file: Path, key: str):
    """One tensor of a safetensors file in fp32, the file mapped for this read only: pages of a mapping kept
    open stay in the process's resident memory, the whole model by the last tensor."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as shard:
        return shard.get_tensor(key).float()


def gguf_name(names, key: str) -> str:
    """llama.cpp's name for an HF tensor name."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise WorkError(f"GGUF export: no GGUF name for tensor {key}")
    return name


def language_model_key(key: str) -> Optional[str]:
    """A checkpoint key as the text model names it; None for the vision tower of a model with one. Gemma 3's
    files hold language_model.model.layers... (or model.language_model.layers...)."""
    if key.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.")):
        return None
    if key.startswith("language_model."):
        return key[len("language_model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def rope_tensors(config, head_dim: int) -> dict:
    """The per-frequency rotary factors llama.cpp reads as tensors: Llama 3.1's (rope_freqs), Phi-3's long
    context ones (rope_factors_long and _short)."""
    import gguf
    import numpy as np

    def name(tensor):
        return f"{gguf.TENSOR_NAMES[tensor]}.weight"

    rope, _ = rope_settings(config)
    factors = llama3_rope_factors(config, head_dim)
    if factors is not None:  # Llama 3.1 and 3.2: llama.cpp divides each frequency by its factor
        return {name(gguf.MODEL_TENSOR.ROPE_FREQS): factors}
    if rope.get("rope_type") == "longrope":
        return {name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG): np.asarray(rope["long_factor"], np.float32),
                name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT): np.asarray(rope["short_factor"], np.float32)}
    return {}


def longrope_attention_factor(config) -> float:
    """Phi-3's attention scale under its long-context rotary factors, as transformers computes it."""
    rope, _ = rope_settings(config)
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
    scale = config.max_position_embeddings / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


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
