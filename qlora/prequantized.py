"""Base checkpoints stored quantized already, by another method than bitsandbytes'. transformers loads a model
through one quantizer only, so such a checkpoint cannot be loaded in 4-bit NF4 as it is:

- MXFP4, gpt-oss's experts as OpenAI ships them: converted once, shard by shard, to a bf16 safetensors
  folder in the cache (transformers' own MXFP4 dequantization), which then loads as any other model.
- bitsandbytes (a pre-quantized *-bnb-4bit checkpoint): loaded as it is.
- any other method (GPTQ, AWQ, FP8, ...): refused, with what to give instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from qlora.errors import UserError

# the converted folder's shards: one in memory at a time
SHARD_BYTES = 2 * 2**30
# what a hub snapshot of a checkpoint holds beside its weights (config, tokenizer, chat template)
MODEL_FILES = ["*.json", "*.jinja", "*.model", "*.txt"]


def quant_method(path: str) -> Optional[str]:
    """The method a checkpoint's weights are stored quantized by (its config's quantization_config), or None.
    A hub id's config.json is in the Hugging Face cache by now (hub.check_hub_model)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        file = folder / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    config = json.loads(file.read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


def loadable_in_4bit(path: str, name_or_path: str, weights: bool = True) -> str:
    """path (a model folder or a hub id) as one bitsandbytes can quantize: the same, or MXFP4 weights'
    converted folder (weights=False: not converted, for what reads the config alone)."""
    method = quant_method(path)
    if method in (None, "bitsandbytes"):
        return path
    if method == "mxfp4":
        return str(mxfp4_converted(path, name_or_path)) if weights else path
    raise UserError(f"model.name_or_path={name_or_path}: its weights are stored quantized ({method}), and "
                    "transformers loads a model through one quantizer, so it cannot quantize them again to "
                    "4-bit NF4; give the model's unquantized (bf16 or fp16) checkpoint")


def mxfp4_converted(path: str, name_or_path: str) -> Path:
    """The bf16 safetensors folder of a checkpoint whose experts are stored in MXFP4 (gpt-oss), converted once
    into the cache: each *_blocks / *_scales pair becomes the bf16 tensor transformers would dequantize it
    to, every other tensor is kept, and the config loses its quantization_config."""
    import torch
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from qlora.merge import ShardWriter
    from qlora.models import cache_dir, say, weight_files

    files = weight_files(path)
    source = files[0].parent
    stamp = ":".join(f"{f.name}:{f.stat().st_size}" for f in files)
    key = hashlib.sha256(f"{source.resolve()}:{stamp}".encode()).hexdigest()[:16]
    target = cache_dir() / "mxfp4" / f"{name_or_path.strip('/').replace('/', '--')}-{key}"
    if (target / "config.json").is_file():
        return target
    if not Path(path).expanduser().is_dir():  # the tokenizer and chat template beside the weights
        from huggingface_hub import snapshot_download

        snapshot_download(path, allow_patterns=MODEL_FILES)
    say(f"model.name_or_path={name_or_path}: its experts are stored in MXFP4, which bitsandbytes does not read; "
        f"converting them once to bf16 in {target} (about 4x their size on disk)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        writer = ShardWriter(tmp, SHARD_BYTES)
        for file in tqdm(files, desc="converting MXFP4", unit="shard"):
            with safe_open(str(file), framework="pt") as shard:
                for name in shard.keys():
                    if name.endswith("_scales"):
                        continue
                    if name.endswith("_blocks"):
                        stem = name[:-len("_blocks")]
                        writer.add(stem, convert_moe_packed_tensors(shard.get_tensor(name), shard.get_tensor(
                            stem + "_scales"), dtype=torch.bfloat16))
                    else:
                        writer.add(name, shard.get_tensor(name))
        writer.close()
        config = json.loads((source / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in source.iterdir():  # the tokenizer, chat template and generation settings
            if file.is_file() and file.suffix != ".safetensors" and \
                    file.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(file, tmp / file.name)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
