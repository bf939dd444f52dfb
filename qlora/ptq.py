"""`qlora quant ptq`: post-training INT8 quantization of a merged model for CPU inference, measured
against the model it came from: size, speed, top-1 agreement and perplexity on held-out text.

- dynamic INT8: every Linear's weights int8 (per channel, torch's dynamic quantized Linear with
  fbgemm/x86 kernels), activations quantized on the fly per batch. Real int8 matmuls: faster on CPU.
- static INT8: activation ranges fixed beforehand from calibration data (per Linear input, min-max
  over the calibration set) and weights int8 per output channel (qlora.quantization). The int8
  arithmetic is simulated in fp32 (quantize, then dequantize): it shows the accuracy of static
  ranges, not their speed.
- int8 weights only: the same int8 weights with fp32 activations, which tells whether the loss
  comes from the weights or from the activations.
"""
from __future__ import annotations

import copy
import json
import math
import time
from typing import Dict, List, Optional

import torch

from qlora.quantization import affine_params, quantize_symmetric


class StaticInt8Linear(torch.nn.Module):
    """A Linear whose input is quantized with fixed (calibrated) affine uint8 parameters and whose
    weight is int8 per output channel; computed as dequantized fp32."""

    def __init__(self, linear: torch.nn.Linear, lo: Optional[float] = None, hi: Optional[float] = None):
        super().__init__()
        q = quantize_symmetric(linear.weight.detach().float(), bits=8, granularity="channel")
        self.register_buffer("weight_int8", q.codes.reshape(linear.weight.shape))
        self.register_buffer("weight_scale", q.scale.float())
        self.bias = linear.bias
        self.act = None  # weight-only when no activation range is given
        if lo is not None:
            scale, zero = affine_params(torch.tensor([lo]), torch.tensor([hi]), 8)
            self.act = (float(scale), float(zero))

    def forward(self, x):
        x_hat = x
        if self.act is not None:
            scale, zero = self.act
            x_hat = (torch.clamp(torch.round(x / scale + zero), 0, 255) - zero) * scale
        w = self.weight_int8.float() * self.weight_scale[:, None]
        return torch.nn.functional.linear(x_hat, w, self.bias)


def calibrate(model, batches: List[torch.Tensor]) -> Dict[str, tuple]:
    """(min, max) of every Linear's input over the calibration batches."""
    ranges: Dict[str, list] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            def hook(m, args, name=name):
                x = args[0].detach()
                lo, hi = ranges.get(name, [math.inf, -math.inf])
                ranges[name] = [min(lo, float(x.min())), max(hi, float(x.max()))]
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {k: tuple(v) for k, v in ranges.items()}


def static_int8(model, ranges: Dict[str, tuple], weights_only: bool = False):
    """Every Linear but the head replaced by StaticInt8Linear (activations fp32 if weights_only)."""
    out = copy.deepcopy(model)
    for name, (lo, hi) in ranges.items():
        parent, _, child = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        layer = getattr(holder, child)
        setattr(holder, child, StaticInt8Linear(layer) if weights_only else StaticInt8Linear(layer, lo, hi))
    return out


def dynamic_int8(model):
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that quantized tensors move to torchao
        # per output channel (one outlier row does not coarsen every other row's grid); the output
        # head stays fp32, as in the static variant: its errors land directly on the logits
        spec = {name: per_channel_dynamic_qconfig for name, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and name != "lm_head"}
        return quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)


def size_mb(model) -> float:
    """Bytes of parameters and buffers, packed int8 weights included."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, DynamicLinear):  # int8 weights inside a packed object
            w, b = mod._weight_bias()
            total += w.int_repr().numel() + (b.numel() * 4 if b is not None else 0) + 8
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.data_ptr() not in seen:  # tied weights count once
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / 1e6


def perplexity_and_top1(model, texts: List[torch.Tensor]):
    """Perplexity over the texts and each text's top-1 tokens (the logits themselves are not kept: a
    held-out set's fp32 logits would not fit in memory)."""
    nll, count, top1 = 0.0, 0, []
    with torch.no_grad():
        for ids in texts:
            out = model(input_ids=ids).logits.float()[0]
            top1.append(out.argmax(-1))
            nll += float(torch.nn.functional.cross_entropy(out[:-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count), top1


def agreement(ref_top1: List[torch.Tensor], top1: List[torch.Tensor]) -> float:
    """The share of positions where the two models' top-1 tokens are the same."""
    return float(sum(int((a == b).sum()) for a, b in zip(ref_top1, top1)) / sum(len(a) for a in ref_top1))


def forward_speed(model, ids: torch.Tensor, repeats: int = 3) -> float:
    """Tokens per second of a full forward pass (prefill) on one batch."""
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids)
    return ids.numel() * repeats / (time.perf_counter() - t)


def ptq_cli(cfg) -> int:
    """The `qlora quant ptq` verb: model.name_or_path is a merged (or any HF) folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.data import read_examples, render_chat
    from qlora.models import resolve_model, say
    from qlora.outputs import claim_output_dir
    from qlora.tracking import write_atomic

    out = claim_output_dir(cfg)
    path = resolve_model(cfg.model.name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    examples = read_examples(cfg.data.eval_path or cfg.data.path, cfg.data)
    texts = [tok(render_chat(tok, ex.messages), return_tensors="pt",
                 add_special_tokens=False).input_ids for ex in examples]
    n_cal = max(1, min(32, len(texts) // 2))
    calibration, held = texts[:n_cal], texts[n_cal:] or texts
    say(f"calibrating on {len(calibration)} examples, measuring on {len(held)}")
    speed_ids = torch.cat([t[:, :32] for t in held[:8] if t.shape[1] >= 32] or [held[0]], dim=0)
    ppl_ref, ref_top1 = perplexity_and_top1(base, held)
    rows = [dict(model="fp32 (merged)", size_mb=round(size_mb(base), 1),
                 tokens_per_second=round(forward_speed(base, speed_ids), 1), perplexity=round(ppl_ref, 4),
                 top1_agreement=1.0)]
    ranges = calibrate(base, calibration)
    candidates = {"dynamic int8": dynamic_int8(base),
                  "static int8 (simulated)": static_int8(base, ranges),
                  "int8 weights only (simulated)": static_int8(base, ranges, weights_only=True)}
    for name, model in candidates.items():
        ppl, top1 = perplexity_and_top1(model, held)
        rows.append(dict(model=name, size_mb=round(size_mb(model), 1),
                         tokens_per_second=round(forward_speed(model, speed_ids), 1), perplexity=round(ppl, 4),
                         top1_agreement=round(agreement(ref_top1, top1), 4)))
    lines = ["| model | size MB | prefill tokens/s | perplexity | top-1 agreement |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['size_mb']} | {r['tokens_per_second']} | {r['perplexity']} | "
              f"{r['top1_agreement']:.2%} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "ptq_report.json", json.dumps(dict(model=str(path), rows=rows), indent=2) + "\n")
    write_atomic(out / "ptq_report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
