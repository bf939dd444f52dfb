"""LoRA on a mixture's expert tensors, added by qlora rather than through PEFT's parametrization.

PEFT puts LoRA on a 3-D experts tensor (transformers' gate_up_proj, down_proj) by registering, at each
forward, a parametrization that adds scaling * lhs @ rhs into a new tensor the size of every expert;
torch evaluates a parametrization once more as it registers it, so that is twice a forward, and a
generated token, routed to a few experts, pays for all of them. Here PEFT's wrapper only hands over its
factors, and the experts module's hooks add them:
- experts held in 4 bits (experts_4bit.py): into the copy just dequantized, in place;
- experts held in full: into a new tensor, once, put in the parameter's place for the forward;
- without gradient, into the experts the tokens are routed to only (the rest of the tensor is left
  unwritten: the experts module multiplies by those it routes to).
PEFT keeps its own way where more than one adapter is active, and under FSDP.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional

LORA = "_qlora_expert_lora"  # on an experts module during a forward: {parameter name: (lhs, rhs, scaling)}
ORIGINAL = "_qlora_expert_original"  # on an experts module held in full during a forward: {name: its tensor}


def take_over(model, full_experts: bool = True) -> None:
    """PEFT's LoRA on the model's expert tensors added by qlora (on 4-bit experts always; on experts held
    in full where full_experts: not under FSDP, whose flat shards the hooks must not replace)."""
    from peft.tuners.lora.layer import ParamWrapper

    from qlora.experts_4bit import STATE, is_expert_tensor

    hooked = set()
    for module in model.modules():
        if not isinstance(module, ParamWrapper):
            continue
        experts, name = module.get_base_layer(), module.parameter_name
        if name in getattr(experts, STATE, {}):
            module.forward = partial(lora_forward, module)
        elif full_experts and is_expert_tensor(experts, getattr(experts, name)):
            module.forward = partial(lora_forward, module)
            if experts not in hooked:
                experts.register_forward_pre_hook(with_lora, with_kwargs=True)
                experts.register_forward_hook(without_lora, always_call=True)
                hooked.add(experts)


def lora_forward(wrapper, x, *args, **kwargs):
    """A PEFT ParamWrapper's forward that hands its factors to the experts module's hooks."""
    adapters = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if wrapper.disable_adapters or wrapper.merged or len(adapters) != 1 or kwargs.get("adapter_names"):
        return type(wrapper).forward(wrapper, x, *args, **kwargs)
    lora = wrapper.get_base_layer().__dict__.setdefault(LORA, {})
    lora[wrapper.parameter_name] = wrapper.get_delta_factors(adapters[0])  # in the tensor's dtype
    try:
        return wrapper.base_layer(x, *args, **kwargs)
    finally:
        lora.pop(wrapper.parameter_name, None)


def routed_experts(args, kwargs, count: int) -> Optional[List[int]]:
    """The experts an experts module's tokens are routed to, from its arguments (transformers' top_k_index,
    or gpt-oss's router_indices), without gradient; None where every expert is to be written: with
    gradient, where the routing is not among the arguments, or where most experts are hit."""
    import torch

    indices = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    if torch.is_grad_enabled() or indices is None:
        return None
    hit = [e for e in torch.unique(indices).tolist() if 0 <= e < count]
    return None if 2 * len(hit) > count else hit


def add_lora(tensor, lora, expert: Optional[int] = None) -> None:
    """LoRA's change (scaling * lhs @ rhs, one product an expert) added in place into a tensor of the
    experts' shape, or into one expert's slice of it; nothing where lora is None."""
    import torch

    if lora is None:
        return
    lhs, rhs, scaling = lora
    with torch.autocast(device_type=tensor.device.type, enabled=False):  # in the tensor's dtype, as PEFT does
        if expert is None:
            tensor.baddbmm_(lhs, rhs, alpha=scaling)
        else:
            tensor.addmm_(lhs[expert], rhs[expert], alpha=scaling)


def with_lora(experts, args, kwargs) -> None:
    """Experts held in full: each tensor with LoRA on it replaced, for this forward, by the tensor plus
    LoRA's change (a new tensor: the model's own stays as it is), or without gradient by a tensor
    holding only the routed experts, each with its change."""
    import torch

    originals, lora = experts.__dict__.setdefault(ORIGINAL, {}), getattr(experts, LORA, {})
    hit = routed_experts(args, kwargs, experts.num_experts) if lora else None  # once a forward
    for name, factors in lora.items():
        tensor = originals[name] = experts._parameters[name]
        lhs, rhs, scaling = factors
        with torch.autocast(device_type=tensor.device.type, enabled=False):
            if hit is None:
                changed = torch.baddbmm(tensor, lhs, rhs, alpha=scaling)
            else:
                changed = torch.empty_like(tensor)
                for e in hit:
                    torch.addmm(tensor[e], lhs[e], rhs[e], alpha=scaling, out=changed[e])
        experts._parameters[name] = changed  # a plain tensor: it carries LoRA's gradient


def without_lora(experts, args, output) -> None:
    """Experts held in full: their own tensors back after the forward (also one checkpointing stops)."""
    for name, tensor in getattr(experts, ORIGINAL, {}).items():
        experts._parameters[name] = tensor
    getattr(experts, ORIGINAL, {}).clear()
