"""Attach LoRA adapters with PEFT and keep their weights in fp32."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from qlora.config import LoraConfig
from qlora.errors import UserError


def attach_lora(model, lora: LoraConfig, gradient_checkpointing: bool, one_dtype=None, compute_dtype=None):
    """A PeftModel with trainable LoRA weights on the frozen (4-bit) base.

    one_dtype (FSDP): every parameter in that dtype, since FSDP flattens one dtype per shard;
    otherwise LoRA weights are fp32 and every frozen weight that is not 4-bit (embeddings, head,
    norms, a mixture's experts) stays in the compute dtype. PEFT's k-bit preparation upcasts those to
    fp32, and fp32 norm weights turn the whole residual stream fp32: measured on an H200 (TinyLlama,
    2048 x 8), that cost 2.5 GiB of peak memory and a third of the speed. Its upcast is not made even
    for a moment: a mixture's 16-bit experts (quant.experts_in_4bit=false; 38 GB in gpt-oss-20b) would
    double in fp32. A mixture's experts held in 4 bits are shown to PEFT at their full shape, and LoRA on
    experts is added by qlora (experts_lora.py)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from qlora.experts_4bit import peft_wrapping

    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model, "is_loaded_in_4bit", False) and one_dtype is None:
        if compute_dtype is not None:
            for p in model.parameters():
                if p.dtype.is_floating_point and p.dtype != compute_dtype and not hasattr(p, "quant_state"):
                    p.data = p.data.to(compute_dtype)
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    targets = lora.target_modules
    beside = outside_the_decoder(model) if targets == ["all-linear"] else []
    if beside:
        from qlora.models import say

        say(f"lora.target_modules=[all-linear]: the language model's linear layers; not those of "
            f"{', '.join(beside)}, which training on text never runs")
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, use_rslora=lora.use_rslora, lora_dropout=lora.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        exclude_modules=exclusion(beside),
        bias=lora.bias.value, modules_to_save=lora.modules_to_save, use_dora=lora.use_dora,
        task_type="CAUSAL_LM")
    try:
        with peft_wrapping(model, fsdp=one_dtype is not None):  # a mixture's experts
            model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise UserError(f"lora.target_modules={list(targets)}: {str(e).splitlines()[0]}") from None
    if one_dtype is None:
        keep_trainable_fp32(model)
    else:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(one_dtype)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def outside_the_decoder(model) -> List[str]:
    """The modules beside the text decoder that hold linear layers, such as a vision tower and its
    projector (model.vision_tower, model.multi_modal_projector): empty for a plain causal LM."""
    import torch

    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return []
    root = next((n for n, m in model.named_modules() if m is decoder), "")
    if not root:
        return []
    head, beside = model.get_output_embeddings(), set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and not name.startswith(root + "."):
            parts, ours = name.split("."), root.split(".")
            depth = next(i for i, part in enumerate(parts) if i >= len(ours) or part != ours[i])
            beside.add(".".join(parts[:depth + 1]))
    return sorted(beside)


def exclusion(beside: List[str]) -> Optional[str]:
    """PEFT's exclude_modules for every module under these (outside_the_decoder's answer), or None."""
    return "(" + "|".join(re.escape(b) for b in beside) + r")\..*" if beside else None


def check_targets(path: str, lora: LoraConfig, trust_remote_code: bool = False) -> None:
    """lora.target_modules must name modules the model has, as PEFT matches them: checked on an empty
    model built from its config on the meta device (no weights: under a second), before the weights
    load. Where the config builds no causal LM here, PEFT checks after loading."""
    if lora.target_modules == ["all-linear"]:
        return
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # PEFT will say it once the model loads
        return
    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    matched = {}  # target -> the modules PEFT would adapt for it
    for target in lora.target_modules:
        one = PeftLoraConfig(target_modules=[target])
        matched[target] = [m for n, m in modules.items() if check_target_module_exists(one, n)]
    key = f"lora.target_modules={list(lora.target_modules)}"
    missing = [t for t, found in matched.items() if not found]
    if missing:
        linear = sorted({n.rpartition(".")[2] for n, m in modules.items()
                         if isinstance(m, torch.nn.Linear) and m is not head})
        raise UserError(f"{key}: {config.model_type} has no module {', '.join(missing)}; its linear layers are "
                        f"{', '.join(linear)} (or use [all-linear])")
    if any(m is head for found in matched.values() for m in found):
        raise UserError(f"{key}: the LM head cannot take an adapter (TRL scores tokens with its weight directly, "
                        "so the adapter would never train); train it in full with lora.modules_to_save=[lm_head]")


def keep_trainable_fp32(model) -> None:
    """Trainable weights in fp32: TRL casts LoRA to bf16 for quantized models, and the fp16 grad
    scaler then refuses bf16 gradients (the plain stack's crash with fp16 compute); fp32 costs
    nothing measurable and keeps small updates from rounding away."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def adapter_dir(path: str) -> Path:
    """The adapter folder of a run directory (or the folder itself)."""
    p = Path(path).expanduser()
    if (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"
    elif not (p / "adapter_config.json").is_file():
        raise UserError(f"adapter={path}: no adapter_config.json there or in its adapter/ folder; "
                        "give a run directory written by `qlora train` or its adapter/ folder")
    if not (p / "adapter_model.safetensors").is_file():
        pickled = " (adapter_model.bin is a pickle, which can run code: not loaded)" \
            if (p / "adapter_model.bin").is_file() else ""
        raise UserError(f"adapter={path}: no adapter_model.safetensors in {p}{pickled}")
    return p
