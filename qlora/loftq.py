"""LoftQ's start for LoRA on a 4-bit base (lora.init=loftq).

QLoRA starts LoRA at zero (B = 0), so training starts from the 4-bit model, whose weights differ from
the original ones by the quantization error E = W - Q. LoftQ (Li et al., 2023) starts instead from the
best rank-r approximation of that error, s B A ~ E (s the LoRA scale, lora_alpha / r), so that at step 0
the layer Q + s B A is as close to W as rank r allows. This is its one-step form: one truncated SVD a
layer, the 4-bit base left as loaded (the paper's iterations re-quantize W - s B A, which would change
the base). The original weights are read from the model's safetensors files one tensor at a time, as
`qlora merge` reads them; a merge of the run adds s B A to the same Q, so it starts from ~W as well.
"""
from __future__ import annotations

import math
from typing import Tuple


def loftq_start(model, base_path: str) -> Tuple[int, int, float]:
    """Sets the LoRA weights (adapter "default") of every 4-bit layer to LoftQ's start. Returns the
    layers set, the 4-bit LoRA layers whose original weight the files do not hold under the layer's
    name (as transformers renames them on load; left at B = 0), and the quantization error left, as a
    share of what it was (Frobenius norm)."""
    import bitsandbytes.functional as bnbf
    import torch
    from safetensors import safe_open

    from qlora.merge import checkpoint_names
    from qlora.models import weight_files

    modules = dict(model.get_base_model().named_modules())
    rename = checkpoint_names(model.get_base_model())
    layers, before, after = 0, 0.0, 0.0
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)  # the randomized SVD: the same start on every rank and every run
        for f in weight_files(base_path):
            with safe_open(str(f), framework="pt") as shard:
                for key in shard.keys():
                    name, _, leaf = rename(key).rpartition(".")
                    module = modules.get(name)
                    if leaf != "weight" or "default" not in getattr(module, "lora_A", {}):
                        continue
                    weight = module.get_base_layer().weight
                    if getattr(weight, "quant_state", None) is None:
                        continue
                    quantized = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
                    error = shard.get_tensor(key).to(quantized.device, torch.float32).reshape(quantized.shape) - quantized
                    a, b = best_rank_r(error, module.r["default"], module.scaling["default"])
                    module.lora_A["default"].weight.copy_(a)
                    module.lora_B["default"].weight.copy_(b)
                    before += float(error.square().sum())
                    after += float((error - module.scaling["default"] * (b @ a)).square().sum())
                    layers += 1
    adapted = sum(1 for m in modules.values() if "default" in getattr(m, "lora_A", {})
                  and getattr(m.get_base_layer().weight, "quant_state", None) is not None)
    return layers, adapted - layers, math.sqrt(after / before) if before else 0.0


def best_rank_r(error, r: int, scale: float):
    """(A, B), r x in and out x r, with scale * B @ A the best rank-r approximation of error (truncated
    SVD, randomized: torch.svd_lowrank), the singular values split evenly between the two."""
    import torch

    k = min(r, *error.shape)
    u, s, v = torch.svd_lowrank(error, q=min(k + 8, *error.shape), niter=4)
    root = (s[:k] / scale).sqrt()
    a = torch.zeros(r, error.shape[1], device=error.device)
    b = torch.zeros(error.shape[0], r, device=error.device)
    a[:k], b[:, :k] = (v[:, :k] * root).T, u[:, :k] * root
    return a, b
