"""Gemma 3's vision tower and its projector as llama.cpp's multimodal projector file (mmproj), written beside
the language model's GGUF: llama.cpp reads images through it (`llama-mtmd-cli -m MODEL --mmproj MMPROJ`,
`llama-server --mmproj`). Only the language model is trained and merged; this part is the base's own."""
from __future__ import annotations

import math
from pathlib import Path

from qlora.config import GgufType

# where a Gemma 3 checkpoint holds the vision part (its files: vision_tower.vision_model..., or without
# vision_model, or under model. as transformers 5 names the modules)
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# Gemma 3's image processor normalizes each channel to [-1, 1]
GEMMA3_IMAGE_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
# llama.cpp's Gemma 3 projector pools 4 x 4 patches into one image token unless the file says otherwise
DEFAULT_POOLING = 4


def has_vision_tower(config) -> bool:
    """Whether a model config holds a vision tower this module writes (Gemma 3 from 4B up)."""
    return config.model_type == "gemma3" and getattr(config, "vision_config", None) is not None


def mmproj_type(kind: GgufType) -> GgufType:
    """The type of the projector file's matrices: f32 with an f32 model, else f16 (the vision tower stays at
    16 bits, as llama.cpp's own converter writes it, whatever the language model's type)."""
    return GgufType.f32 if kind is GgufType.f32 else GgufType.f16


def write_mmproj(folder: Path, path: Path, kind: GgufType, name: str) -> None:
    """Write the vision tower and projector of the Gemma 3 in `folder` as an mmproj GGUF file."""
    import gguf
    import numpy as np
    from transformers import AutoConfig

    from qlora.gguf_writer import gguf_name, read_tensor
    from qlora.models import weight_files

    config = AutoConfig.from_pretrained(folder)
    vision = config.vision_config
    writer = gguf.GGUFWriter(str(path), "clip", use_temp_file=True)
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if kind is GgufType.f32 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(vision.num_hidden_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(float(vision.layer_norm_eps))
    writer.add_vision_use_gelu(True)  # SigLIP's gelu_pytorch_tanh
    mean, std = image_mean_std(folder)
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)
    # the projector averages pooling x pooling patches into each of the mm_tokens_per_image tokens
    pooling = (vision.image_size // vision.patch_size) // math.isqrt(config.mm_tokens_per_image)
    if pooling != DEFAULT_POOLING:
        writer.add_vision_projector_scale_factor(pooling)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision.num_hidden_layers)
    for file in weight_files(str(folder)):
        for key, hf_key in vision_keys(file):
            t = read_tensor(file, key)
            if hf_key.endswith("soft_emb_norm.weight"):  # Gemma's norm scales by 1 + weight, llama.cpp's by the weight
                t = t + 1.0
            data = t.numpy().astype(np.float32)
            gguf_key = gguf_name(names, hf_key)
            # vectors and the patch and position embeddings f32, as llama.cpp's converter writes them
            if kind is GgufType.f32 or data.ndim == 1 or gguf_key.startswith(("v.patch_embd", "v.position_embd")):
                writer.add_tensor(gguf_key, data)
            else:
                writer.add_tensor(gguf_key, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def vision_keys(file: Path):
    """(the file's key, its name as llama.cpp's tensor map knows it) for each tensor of the vision part."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as shard:
        keys = list(shard.keys())
    for key in keys:
        if not key.startswith(VISION_PREFIXES):
            continue
        hf_key = key[len("model."):] if key.startswith("model.") else key
        if hf_key.startswith("vision_tower.") and not hf_key.startswith("vision_tower.vision_model."):
            hf_key = "vision_tower.vision_model." + hf_key[len("vision_tower."):]
        if hf_key.endswith("_weight"):  # multi_modal_projector.mm_input_projection_weight, a bare parameter
            hf_key = hf_key[:-len("_weight")] + ".weight"
        yield key, hf_key


def image_mean_std(folder: Path):
    """The image processor's per-channel mean and std: its preprocessor_config.json's, else Gemma 3's."""
    import json

    file = folder / "preprocessor_config.json"
    if file.is_file():
        processor = json.loads(file.read_text())
        if "image_mean" in processor and "image_std" in processor:
            return processor["image_mean"], processor["image_std"]
    return GEMMA3_IMAGE_MEAN_STD
