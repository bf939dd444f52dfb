"""train.head_one_pass on CPU: TRL's chunked LM head (its tiles worked in place, qlora's default
before this lever) against the head that forms its input gradient in the forward pass, forward
and backward, interleaved in one process.

usage: python bench/one_pass_head.py [--tokens 330,1024,2048] [--reps 5] [--out bench/results/one_pass_head.json]
       python bench/one_pass_head.py --bf16 [--out bench/results/one_pass_head_bf16.json]

The head, hidden states and outputs are bench/head_tiles.py's: SmolLM2-135M's (49,152 x 576, fp32,
frozen), scored as TRL's SFT trainer asks, in qlora's CPU tiles (1024 tokens x 8192 columns).

--bf16: the one-pass head with its products in fp32 against bf16 (train.bf16_base_products, for CPUs
with bf16 units), on SmolLM2's own head and the hidden states its decoder gives the demo rows (real
logits, up to ~30, are what bf16 rounds): the times, the mean log-probability's change and the
input gradient's relative difference.
"""
import argparse
import json
from functools import partial
from pathlib import Path

import torch
from head_tiles import HIDDEN, VOCAB, head_pass, interleaved
from trl.kernels import ChunkedLogProbFunction

from qlora.one_pass_head import OnePassLogProb, head_one_pass
from qlora.speed import CPU_HEAD_TILE, head_tiles_in_place, small_head_tiles

KINDS = {"two passes": ChunkedLogProbFunction, "one pass": OnePassLogProb}


def smollm2_head(n_tokens: int) -> tuple:
    """SmolLM2's head weight, the last hidden states of its decoder on the first n_tokens of the demo
    rows (one row, without gradient), and their next tokens."""
    from smollm2_cpu import lora_model

    _, rows, model = lora_model()
    ids = torch.tensor([sum((r["input_ids"] for r in rows), [])[:n_tokens + 1]])
    with torch.no_grad():
        hidden = model.get_base_model().model(input_ids=ids[:, :-1]).last_hidden_state[0]
    return hidden, model.get_base_model().lm_head.weight.detach(), ids[0, 1:]


def bf16_products(bf16: bool):
    """head_pass through the one-pass head, its products in bf16 or fp32."""
    def run(hidden, weight, targets):
        with head_one_pass(True, bf16_products=bf16):
            return head_pass(hidden, weight, targets, function=OnePassLogProb)
    return run


def compare_bf16(tokens: list, reps: int, out: str) -> None:
    print("| tokens | fp32 products ms | bf16 products ms | speed-up | loss fp32 | loss bf16 | input gradient rel. diff |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n in tokens:
        hidden, weight, targets = smollm2_head(n)
        with small_head_tiles(True), head_tiles_in_place(True):
            times, results = interleaved({"fp32": bf16_products(False), "bf16": bf16_products(True)},
                                         hidden, weight, targets, reps)
        (l32, _, _, g32), (l16, _, _, g16) = results["fp32"], results["bf16"]
        ms = {k: 1e3 * min(v) for k, v in times.items()}
        row = dict(tokens=n, fp32_ms=round(ms["fp32"], 1), bf16_ms=round(ms["bf16"], 1),
                   speedup=round(ms["fp32"] / ms["bf16"], 2), loss_fp32=l32, loss_bf16=l16,
                   grad_rel_diff=((g16 - g32).norm() / g32.norm()).item(),
                   fp32_all_ms=[round(1e3 * x, 1) for x in times["fp32"]],
                   bf16_all_ms=[round(1e3 * x, 1) for x in times["bf16"]])
        rows.append(row)
        print(f"| {n} | {row['fp32_ms']} | {row['bf16_ms']} | {row['speedup']}x | {l32:.4f} | {l16:.4f} | "
              f"{row['grad_rel_diff']:.4f} |", flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(reps=reps, tile=CPU_HEAD_TILE, rows=rows), indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="330,1024,2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="fp32 against bf16 products (above)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.bf16:
        return compare_bf16(list(map(int, a.tokens.split(","))), a.reps,
                            a.out or "bench/results/one_pass_head_bf16.json")
    a.out = a.out or "bench/results/one_pass_head.json"
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN) * 0.05
    rows = []
    print("| tokens | two passes ms | one pass ms | speed-up | same numbers |")
    print("|---|---|---|---|---|")
    for n in map(int, a.tokens.split(",")):
        hidden, targets = torch.randn(n, HIDDEN), torch.randint(0, VOCAB, (n,))
        with small_head_tiles(True), head_tiles_in_place(True):
            times, results = interleaved({kind: partial(head_pass, function=f) for kind, f in KINDS.items()},
                                         hidden, weight, targets, a.reps)
        (lt, et, tt, gt), (lo, eo, to, go) = results["two passes"], results["one pass"]
        same = lt == lo and et == eo and tt == to and torch.allclose(gt, go, rtol=1e-5, atol=1e-8)
        ms = {k: 1e3 * min(v) for k, v in times.items()}
        row = dict(tokens=n, two_passes_ms=round(ms["two passes"], 1), one_pass_ms=round(ms["one pass"], 1),
                   speedup=round(ms["two passes"] / ms["one pass"], 2), same_numbers=same,
                   max_grad_diff=(gt - go).abs().max().item(),
                   two_passes_all_ms=[round(1e3 * x, 1) for x in times["two passes"]],
                   one_pass_all_ms=[round(1e3 * x, 1) for x in times["one pass"]])
        rows.append(row)
        print(f"| {n} | {row['two_passes_ms']} | {row['one_pass_ms']} | {row['speedup']}x | {same} |", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(reps=a.reps, tile=CPU_HEAD_TILE, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
