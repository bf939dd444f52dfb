"""train.optim on CPU: one AdamW step (with the trainer's gradient clipping) over SmolLM2's LoRA
weights (r=8 on every linear layer: 420 tensors, 2.4M weights), for PyTorch's three AdamW kernels
and bitsandbytes' 8-bit AdamW, alternating in one process.

usage: python bench/optimizer_step.py [--steps 30] [--out bench/results/optimizer_step.json]

for-loop is what train.optim=adamw_torch runs on CPU (PyTorch picks foreach only for GPU tensors);
fused is train.optim=adamw_torch_fused, what train.optim=auto and TRL's SFTConfig pick on CPU;
bnb-8bit is train.optim=adamw_8bit (paged_adamw_8bit runs it unpaged on CPU), whose state takes 2 bytes
a weight where AdamW's takes 8 (bitsandbytes keeps tensors under 4096 weights in 32 bits).
The first three steps of each kind are warm-up; the table gives medians of the rest, and how far
each kind's weights end from the for-loop's.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from smollm2_cpu import lora_model

KINDS = {"for-loop": lambda ps: torch.optim.AdamW(ps, lr=2e-4, weight_decay=0.0, foreach=False),
         "foreach": lambda ps: torch.optim.AdamW(ps, lr=2e-4, weight_decay=0.0, foreach=True),
         "fused": lambda ps: torch.optim.AdamW(ps, lr=2e-4, weight_decay=0.0, fused=True),
         "bnb-8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=2e-4, weight_decay=0.0)}


def state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="bench/results/optimizer_step.json")
    a = ap.parse_args()
    _, _, model = lora_model()
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    params = {kind: [torch.nn.Parameter(p.clone()) for p in start] for kind in KINDS}
    optimizers = {kind: make(params[kind]) for kind, make in KINDS.items()}
    seconds = {kind: [] for kind in KINDS}
    generator = torch.Generator().manual_seed(0)
    for step in range(a.steps):
        grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in start]
        for kind in (list(KINDS) if step % 2 else list(KINDS)[::-1]):
            for p, g in zip(params[kind], grads):
                p.grad = g.clone()
            began = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params[kind], 0.3)
            optimizers[kind].step()
            if step >= 3:
                seconds[kind].append(time.perf_counter() - began)
    weights = sum(p.numel() for p in start)
    results = {"tensors": len(start), "weights": weights, "steps": a.steps, "kinds": {}}
    print(f"{len(start)} LoRA tensors, {weights / 1e6:.1f}M weights")
    print(f"{'kind':>9} {'ms/step':>8} {'vs for-loop':>11} {'max |w - for-loop w|':>21} {'state MB':>9}")
    base = statistics.median(seconds["for-loop"])
    for kind in KINDS:
        ms = statistics.median(seconds[kind]) * 1e3
        drift = max((p - q).abs().max().item() for p, q in zip(params[kind], params["for-loop"]))
        mb = state_bytes(optimizers[kind]) / 1e6
        results["kinds"][kind] = {"ms": round(ms, 2), "speedup": round(base * 1e3 / ms, 2), "max_weight_diff": drift,
                                  "state_mb": round(mb, 2)}
        print(f"{kind:>9} {ms:8.1f} {base * 1e3 / ms:10.2f}x {drift:21.2e} {mb:9.1f}")
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
