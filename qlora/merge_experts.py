"""A mixture of experts in a merge: PEFT puts LoRA on the 3-D tensor that transformers fuses a layer's experts
into as it loads them (gate and up joined), while the files hold one tensor an expert and product; experts
held in 4 bits (quant.experts_in_4bit) are written as training saw them, dequantized. Such tensors are
written from the model, split back into the files' tensors by transformers' own conversion, reversed."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple


def unwrapped(name: str) -> str:
    """A module's name in the model without PEFT's wrappers (experts.base_layer -> experts)."""
    return name.replace(".base_layer", "")


def parameter_of(name: str, module) -> Optional[str]:
    """The parameter a PEFT ParamWrapper puts LoRA on (a mixture's 3-D experts tensor), by the model's name
    for it; None for a LoRA layer on a whole Linear."""
    parameter = getattr(module, "parameter_name", None)
    return f"{unwrapped(name)}.{parameter}" if parameter else None


def from_model(modules: Dict[str, object], dequantized: bool) -> Dict[str, Tuple[object, str, object]]:
    """{parameter: (the module holding it, its name there, its ParamWrapper or None)} for each tensor the
    merge writes from the model: each with LoRA on it through a ParamWrapper (a mixture's experts) and,
    for merge.into=dequantized, each expert tensor held in 4 bits."""
    from qlora.experts_4bit import STATE

    found = {}
    for name, module in modules.items():
        parameter = parameter_of(name, module)
        if parameter is not None and "default" in getattr(module, "lora_A", {}):
            found[parameter] = (module.get_base_layer(), module.parameter_name, module)
    if dequantized:
        for name, module in modules.items():
            for pname in getattr(module, STATE, {}):
                found.setdefault(f"{unwrapped(name)}.{pname}", (module, pname, None))
    return found


def fused_layout(model, sources: Dict[str, Tuple[object, str, object]]) -> Dict[str, List[str]]:
    """{parameter: the file keys it is saved as} for each tensor the merge writes from the model (sources:
    from_model's answer): a mixture's experts are one 3-D tensor a layer that the files may hold one expert
    (and gate and up) apart. Found by reverting transformers' own conversion on empty (meta) tensors."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from qlora.experts_4bit import full_tensor

    layout = {}
    for parameter, (module, pname, _) in sources.items():
        shape = full_tensor(module, pname).shape
        layout[parameter] = sorted(revert_weight_conversion(model, {parameter: torch.empty(shape, device="meta")}))
    return layout


def fused_merged(model, source: Tuple[object, str, object], parameter: str, dequantized: bool) -> Dict[str, object]:
    """A tensor the merge writes from the model (source: its from_model entry), split into the files'
    tensors, in fp32: its LoRA (PEFT's own delta) folded into the base training saw (the model's tensor;
    experts held in 4 bits, dequantized); for merge.into=original (not dequantized), the delta alone, for
    adding to the files' own tensors."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from qlora.experts_4bit import full_tensor

    module, pname, wrapper = source
    base = full_tensor(module, pname).detach().float().cpu()  # (the model's own tensor where it is fp32)
    weight = base if dequantized else torch.zeros_like(base)
    if wrapper is not None:
        weight = weight + wrapper.get_delta_weight("default").detach().float().cpu()
    return revert_weight_conversion(model, {parameter: weight})
