"""A mixture of experts in a merge: PEFT puts LoRA on the 3-D tensor that transformers fuses a layer's experts
into as it loads them (gate and up joined), while the files hold one tensor an expert and product. The
merged tensor is split back into the files' tensors by transformers' own conversion, reversed."""
from __future__ import annotations

from typing import Dict, List, Optional


def unwrapped(name: str) -> str:
    """A module's name in the model without PEFT's wrappers (experts.base_layer -> experts)."""
    return name.replace(".base_layer", "")


def parameter_of(name: str, module) -> Optional[str]:
    """The parameter a PEFT ParamWrapper puts LoRA on (a mixture's 3-D experts tensor), by the model's name
    for it; None for a LoRA layer on a whole Linear."""
    parameter = getattr(module, "parameter_name", None)
    return f"{unwrapped(name)}.{parameter}" if parameter else None


def fused_layout(model, modules: Dict[str, object]) -> Dict[str, List[str]]:
    """{parameter: the file keys it is saved as} for each parameter with LoRA that transformers fused from
    several of the files' tensors as it loaded them: a mixture's experts, one 3-D tensor a layer that the
    files hold one expert (and gate and up) apart. Found by reverting transformers' own conversion on
    empty (meta) tensors."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    layout = {}
    for name, module in modules.items():
        parameter = parameter_of(name, module)
        if parameter is None or "default" not in getattr(module, "lora_A", {}):
            continue
        shape = module.get_param().shape
        saved = revert_weight_conversion(model, {parameter: torch.empty(shape, device="meta")})
        if len(saved) > 1:
            layout[parameter] = sorted(saved)
    return layout


def fused_merged(model, modules: Dict[str, object], parameter: str) -> Dict[str, object]:
    """A fused parameter with its LoRA folded in (PEFT's own delta, in fp32), split back into the tensors the
    files hold. The experts were never quantized: the base is the model's own tensor, what training saw."""
    from transformers.core_model_loading import revert_weight_conversion

    module = next(m for n, m in modules.items() if parameter_of(n, m) == parameter)
    weight = module.get_param().detach().float().cpu() + module.get_delta_weight("default").detach().float().cpu()
    return revert_weight_conversion(model, {parameter: weight})
