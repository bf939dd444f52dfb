"""A mixture's experts held in 4 bits (quant.experts_in_4bit).

transformers holds a layer's experts as 3-D tensors (gate_up_proj, down_proj), which bitsandbytes'
4-bit loading leaves in 16 bits: they are most of a mixture's weights (54 of Qwen3-30B-A3B's 65 GiB).
Here each is quantized as the linear layers are (NF4 or FP4, blocks of 64, double quantization as
quant says) the moment transformers sets it while loading, so no more than one layer's experts are ever
in 16 bits. The block that runs them (the experts module's parent) dequantizes them for its forward and
puts the codes back after it; LoRA on them is added into that copy in place (experts_lora.py). With
gradient checkpointing one layer's are in 16 bits at a time; without it each layer keeps, until its
backward, the tensor it multiplied by, as it would with experts in full. A forward without gradient
(generation, evaluation) dequantizes only the experts its tokens are routed to, once the experts
module is given them: a generated token goes to a few of a layer's many.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator, List, Tuple

STATE = "_qlora_4bit_experts"  # on an experts module: {parameter name: Packed}


@dataclass
class Packed:
    codes: object  # the packed 4-bit codes, as an nn.Parameter (uint8, no gradient)
    quant_state: object  # bitsandbytes' QuantState: block scales, code book, shape and dtype
    unfilled: object = None  # during a forward without gradient: the tensor its routed experts go into


def is_expert_tensor(module, tensor) -> bool:
    """A 3-D tensor of a module that holds one slice an expert (transformers' experts modules)."""
    n = getattr(module, "num_experts", None)
    return tensor.dim() == 3 and tensor.is_floating_point() and n is not None and tensor.shape[0] == n


def wanted(quant, fsdp: bool = False) -> bool:
    """Whether a mixture's experts are held in 4 bits: quant.experts_in_4bit on a 4-bit base, but not under
    FSDP, which shards one dtype."""
    return quant.load_in_4bit and quant.experts_in_4bit and not fsdp


def expert_tensors(model) -> List[Tuple[str, object, str]]:
    """(module name, module, parameter name) of each expert tensor the model holds in full."""
    return [(name, module, pname) for name, module in model.named_modules()
            for pname, p in module.named_parameters(recurse=False) if is_expert_tensor(module, p)]


@contextmanager
def quantized_while_loading(quant_type: str, double_quant: bool) -> Iterator[None]:
    """Every expert tensor set on a module inside this block (transformers loading a model) is held in 4
    bits from then on: its module gets the codes in its place."""
    import torch
    import bitsandbytes.functional as bnbf
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def pack(module, name, param):
        if param is None or param.is_meta or not is_expert_tensor(module, param):
            return None
        codes, state = bnbf.quantize_4bit(param.data.contiguous(), blocksize=64, compress_statistics=double_quant,
                                          quant_type=quant_type)
        packed = Packed(torch.nn.Parameter(codes, requires_grad=False), state)
        packed.codes.__dict__.update(param.__dict__)  # transformers' marks on it (_is_hf_initialized)
        if not hasattr(module, STATE):
            setattr(module, STATE, {})
        getattr(module, STATE)[name] = packed
        return packed.codes

    handle = register_module_parameter_registration_hook(pack)
    try:
        yield
    finally:
        handle.remove()


def held(model) -> List[Tuple[str, object]]:
    """(name, module) of each experts module holding 4-bit tensors."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, STATE)]


def run_dequantized(model) -> None:
    """Hook each block that runs 4-bit experts: dequantized for its forward, packed again after it
    (also when the forward stops early, as checkpointing's recomputation does)."""
    modules, blocks = dict(model.named_modules()), {}
    for name, experts in held(model):
        blocks.setdefault(block_of(name), []).append(experts)
        experts.register_forward_pre_hook(fill_experts, with_kwargs=True)
    for name, held_there in blocks.items():
        modules[name].register_forward_pre_hook(partial(unpack_experts, held_there))
        modules[name].register_forward_hook(partial(pack_experts, held_there), always_call=True)


def block_of(name: str) -> str:
    """The module whose forward runs an experts module: its parent (above any PEFT wrappers of it)."""
    parts = name.split(".")
    while parts and parts[-1] == "base_layer":
        parts.pop()
    return ".".join(parts[:-1])


def say_held(model, quant) -> None:
    """The line that says what a mixture's experts take, in 4 bits or not."""
    from qlora.models import say, weight_count

    packed = [p for _, m in held(model) for p in getattr(m, STATE).values()]
    full = [getattr(m, n) for _, m, n in expert_tensors(model)]
    if not packed and not full:
        return
    count = sum(p.quant_state.shape.numel() for p in packed) + sum(t.numel() for t in full)
    dtype = packed[0].quant_state.dtype if packed else full[0].dtype
    size = count * dtype.itemsize / 2**30
    what = f"a mixture of experts: its {weight_count(count)} expert weights ({size:.2f} GiB in {name_of(dtype)})"
    if packed:
        codes = sum(p.codes.numel() * p.codes.element_size() for p in packed) / 2**30
        say(f"{what} held in 4-bit {quant.bnb_4bit_quant_type.value} ({codes:.2f} GiB), each layer's "
            "dequantized as it runs (quant.experts_in_4bit)")
    else:
        why = ("quant.load_in_4bit=false" if not quant.load_in_4bit else "quant.experts_in_4bit=false"
               if not quant.experts_in_4bit else "under FSDP, which shards one dtype")
        say(f"{what} stay in {name_of(dtype)} ({why}; qlora plan counts them)")


def name_of(dtype) -> str:
    return str(dtype).replace("torch.", "")


@contextmanager
def peft_wrapping(model, fsdp: bool = False) -> Iterator[None]:
    """Around PEFT putting LoRA on a model: its 4-bit expert tensors seen at their full shape, dtype and
    device (one element each, repeated), as PEFT reads their shapes, not their values; after, LoRA on
    a mixture's experts added by qlora (experts_lora.take_over; on those held in full, not under FSDP)."""
    import torch

    from qlora.experts_lora import take_over

    for _, module in held(model):
        for pname, packed in getattr(module, STATE).items():
            state = packed.quant_state
            view = torch.empty((), dtype=state.dtype, device=packed.codes.device).expand(state.shape)
            module._parameters[pname] = torch.nn.Parameter(view, requires_grad=False)
    try:
        yield
    finally:
        for _, module in held(model):
            for pname, packed in getattr(module, STATE).items():
                module._parameters[pname] = packed.codes
    take_over(model, full_experts=not fsdp)


def dequantized(module, pname: str):
    """An expert tensor as training sees it: its 4-bit codes dequantized in its own dtype."""
    import bitsandbytes.functional as bnbf

    packed = getattr(module, STATE)[pname]
    return bnbf.dequantize_4bit(packed.codes.data, packed.quant_state)


def full_tensor(module, pname: str):
    """A module's tensor in full: an expert tensor held in 4 bits dequantized, any other as it is."""
    return dequantized(module, pname) if pname in getattr(module, STATE, {}) else getattr(module, pname)


def unpack_experts(held_there, block, args) -> None:
    """A block's experts dequantized for its forward; without gradient, left for fill_experts to fill."""
    import torch

    for module in held_there:
        for pname, packed in getattr(module, STATE).items():
            if torch.is_grad_enabled() or not slices_by_expert(packed):
                tensor = dequantized(module, pname)
            else:
                state = packed.quant_state
                tensor = packed.unfilled = torch.empty(state.shape, dtype=state.dtype, device=packed.codes.device)
            module._parameters[pname] = torch.nn.Parameter(tensor, requires_grad=False)


def fill_experts(experts, args, kwargs) -> None:
    """The experts the tokens are routed to, dequantized into the tensors unpack_experts left unfilled
    (all of them where the routing is not among the arguments, or most experts are hit); the others are
    left unwritten: the experts module multiplies by those it routes to, and only without gradient.
    Then LoRA's change added in place to the experts filled (through autograd, with gradient)."""
    from qlora.experts_lora import LORA, add_lora, routed_experts

    lora = getattr(experts, LORA, {})  # empty where PEFT adds it (more than one adapter)
    held_there = getattr(experts, STATE)
    hit = routed_experts(args, kwargs, next(iter(held_there.values())).quant_state.shape[0])  # once a forward
    for pname, packed in held_there.items():
        tensor, packed.unfilled = packed.unfilled, None
        if tensor is None:  # dequantized whole by unpack_experts
            if pname in lora:  # (else PEFT's parametrization may hold the tensor: more than one adapter)
                add_lora(experts._parameters[pname], lora[pname])
            continue
        if hit is None:
            tensor.copy_(dequantized(experts, pname))
            add_lora(tensor, lora.get(pname))
            continue
        absmax = block_scales(packed.quant_state)
        for e in hit:
            dequantize_expert(packed, absmax, e, tensor[e])
            add_lora(tensor[e], lora.get(pname), e)


def slices_by_expert(packed) -> bool:
    """Whether each expert's weights are whole 4-bit blocks (of 64), so that one expert dequantizes alone."""
    return packed.quant_state.shape[1:].numel() % packed.quant_state.blocksize == 0


def block_scales(state):
    """A quantized tensor's block scales in fp32 (double quantization undone)."""
    import bitsandbytes.functional as bnbf

    if not state.nested:
        return state.absmax.float()
    return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def dequantize_expert(packed, absmax, e: int, out) -> None:
    """Expert e's weights, dequantized into out (its slice of the full tensor)."""
    import bitsandbytes.functional as bnbf

    state = packed.quant_state
    n = state.shape[1:].numel()
    blocks = n // state.blocksize
    one = bnbf.QuantState(absmax=absmax[e * blocks:(e + 1) * blocks], shape=out.shape, code=state.code,
                          blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
    out.copy_(bnbf.dequantize_4bit(packed.codes.data[e * n // 2:(e + 1) * n // 2], one))


def pack_experts(held_there, block, args, output) -> None:
    for module in held_there:
        for pname, packed in getattr(module, STATE).items():
            module._parameters[pname] = packed.codes
            packed.unfilled = None
