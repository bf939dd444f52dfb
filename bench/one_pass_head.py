"""train.head_one_pass on CPU: TRL's chunked LM head (its tiles worked in place, qlora's default
before this lever) against the head that forms its input gradient in the forward pass, forward
and backward, interleaved in one process.

usage: python bench/one_pass_head.py [--tokens 330,1024,2048] [--reps 5] [--out bench/results/one_pass_head.json]

The head, hidden states and outputs are bench/head_tiles.py's: SmolLM2-135M's (49,152 x 576, fp32,
frozen), scored as TRL's SFT trainer asks, in qlora's CPU tiles (1024 tokens x 8192 columns).
"""
import argparse
import json
from functools import partial
from pathlib import Path

import torch
from head_tiles import HIDDEN, VOCAB, head_pass, interleaved
from trl.kernels import ChunkedLogProbFunction

from qlora.one_pass_head import OnePassLogProb
from qlora.speed import CPU_HEAD_TILE, head_tiles_in_place, small_head_tiles

KINDS = {"two passes": ChunkedLogProbFunction, "one pass": OnePassLogProb}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="330,1024,2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results/one_pass_head.json")
    a = ap.parse_args()
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
