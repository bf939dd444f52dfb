"""train.fast_dequant on CPU: bitsandbytes' CPU dequantization against our kernel on SmolLM2 (210
4-bit layers, 106M weights, NF4 with double quantization), alternating in one process.

usage: python bench/dequant.py [--rounds 12] [--steps 12] [--tokens 24] [--bf16] [--out bench/results/dequant.json]

1. The kernel alone: each round dequantizes every layer with each, in alternating order (training
   does this at every forward and again at every backward); medians per layer shape and for the
   whole model, and a check that the weights are equal bit for bit.
2. In training: the decoder stack forward and backward on the demo's first 4 rows (the bench's
   batch), with train.fused_lora as training runs it, each pass with and without the kernel,
   alternating (as bench/fused_lora.py; the LM head is left out). This machine's speed drifts more
   between processes than the lever changes a whole step, hence the one process.
3. Generation (gen.fast_dequant): greedy new tokens per second at batch 1 with the LoRA layers
   attached, bitsandbytes' matmul against ours, alternating, and whether the tokens are the same.
The first two rounds or passes of each kind are warm-up. --bf16: the weights in bf16 (bitsandbytes'
fp32 ones cast, against our kernel's straight in bf16) and the decoder passes with the base's
products in bf16, as train.bf16_base_products trains.
"""
import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch
from smollm2_cpu import decoder_pass, lora_model

from qlora.data import collate_packed
from qlora.dequant import dequantize_4bit, fast_dequant, kernel, use_for_inference
from qlora.fused_lora import fused_lora


def decoder_passes(tokenizer, rows, model, steps: int, bf16: bool = False) -> dict:
    """Seconds of the decoder's forward and backward on 4 rows, with (True) and without our kernel."""
    batch = collate_packed(rows[:4], pad_id=tokenizer.pad_token_id)
    seconds = {True: [], False: []}
    for step in range(steps):
        for ours in ((False, True) if step % 2 else (True, False)):
            with fused_lora(bf16_base=bf16), fast_dequant(ours):
                seconds[ours].append(decoder_pass(model, batch))
    model.zero_grad(set_to_none=True)
    return dict(tokens=int((batch["input_ids"] != tokenizer.pad_token_id).sum()),
                **{k: seconds[v][2:] for k, v in (("qlora", True), ("bitsandbytes", False))})


def generation(tokenizer, model, n_tokens: int, rounds: int = 4) -> dict:
    """Greedy tokens per second of the model with bitsandbytes' matmul (False) and ours (True), alternating."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a robot."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    rates, outputs = {"bitsandbytes": [], "qlora": []}, {}
    model.eval()
    for r in range(rounds):
        for ours in ((False, True) if r % 2 else (True, False)):
            use_for_inference(ours)
            began = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            rates["qlora" if ours else "bitsandbytes"].append(n_tokens / (time.perf_counter() - began))
            outputs[ours] = out
    use_for_inference(False)
    return dict(rates, same_tokens=torch.equal(outputs[True], outputs[False]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--bf16", action="store_true", help="bf16 weights and base products")
    ap.add_argument("--out", default="bench/results/dequant.json")
    a = ap.parse_args()
    lib, problem = kernel()
    if lib is None:
        raise SystemExit(f"the kernel could not be built: {problem}")
    tokenizer, rows, model = lora_model()
    weights = list({id(m.weight): m.weight for m in model.modules()  # PEFT's layers show their base's weight too
                    if hasattr(getattr(m, "weight", None), "quant_state")}.values())
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    kinds = {"bitsandbytes": lambda w: bnbf.dequantize_4bit(w, w.quant_state).to(dtype),
             "qlora": lambda w: dequantize_4bit(w, w.quant_state, dtype)}
    total = {k: [] for k in kinds}
    by_shape = {k: defaultdict(list) for k in kinds}
    for r in range(a.rounds):
        for kind in (list(kinds) if r % 2 else list(kinds)[::-1]):
            began = time.perf_counter()
            for w in weights:
                t = time.perf_counter()
                kinds[kind](w)
                if r >= 2:
                    by_shape[kind][tuple(w.quant_state.shape)].append(time.perf_counter() - t)
            if r >= 2:
                total[kind].append(time.perf_counter() - began)
    equal = all(torch.equal(kinds["qlora"](w), kinds["bitsandbytes"](w)) for w in weights)
    n = sum(w.quant_state.shape.numel() for w in weights)
    ms = {k: statistics.median(v) * 1e3 for k, v in total.items()}
    print(f"{len(weights)} layers, {n / 1e6:.0f}M weights to {dtype_name}, {torch.get_num_threads()} threads; "
          f"bit for bit equal: {equal}")
    print(f"{'shape':>12} {'bitsandbytes us':>16} {'qlora us':>9} {'speedup':>8}")
    shapes = {}
    for shape in sorted(by_shape["qlora"]):
        b, q = (statistics.median(by_shape[k][shape]) * 1e6 for k in kinds)
        shapes["x".join(map(str, shape))] = {"bitsandbytes_us": round(b, 1), "qlora_us": round(q, 1)}
        print(f"{'x'.join(map(str, shape)):>12} {b:16.0f} {q:9.0f} {b / q:7.2f}x")
    print(f"{'whole model':>12} {ms['bitsandbytes']:13.1f} ms {ms['qlora']:6.1f} ms {ms['bitsandbytes'] / ms['qlora']:7.2f}x")
    passes = decoder_passes(tokenizer, rows, model, a.steps, a.bf16)
    b, q = (statistics.median(passes[k]) for k in ("bitsandbytes", "qlora"))
    pairs = [x / y for x, y in zip(passes["bitsandbytes"], passes["qlora"])]
    print(f"decoder forward and backward, {passes['tokens']} tokens: bitsandbytes {b:.3f} s, qlora {q:.3f} s, "
          f"{b / q:.2f}x (pairs {min(pairs):.2f}-{max(pairs):.2f}x)")
    rates = generation(tokenizer, model, a.tokens)
    g = {k: statistics.median(v) for k, v in rates.items() if k != "same_tokens"}
    print(f"generation, {a.tokens} new tokens: bitsandbytes {g['bitsandbytes']:.2f} tokens/s, qlora {g['qlora']:.2f} "
          f"({g['qlora'] / g['bitsandbytes']:.2f}x); the same tokens: {rates['same_tokens']}")
    results = dict(layers=len(weights), weights=n, dtype=dtype_name, threads=torch.get_num_threads(), rounds=a.rounds,
                   equal=equal,
                   whole_model_ms={k: round(v, 2) for k, v in ms.items()},
                   speedup=round(ms["bitsandbytes"] / ms["qlora"], 2), shapes=shapes,
                   decoder=dict(tokens=passes["tokens"], bitsandbytes_seconds=round(b, 4), qlora_seconds=round(q, 4),
                                speedup=round(b / q, 3), pair_speedups=[round(x, 3) for x in pairs]),
                   generation=dict(new_tokens=a.tokens, tokens_per_second={k: round(v, 2) for k, v in g.items()},
                                   speedup=round(g["qlora"] / g["bitsandbytes"], 2), same_tokens=rates["same_tokens"],
                                   runs={k: [round(x, 2) for x in rates[k]] for k in g}))
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
