"""train.head_tiles_in_place on CPU: TRL's chunked LM head (forward and backward) with its own torch
tiles and with ours worked in place, interleaved in one process (this machine drifts more than
some levers change).

usage: python bench/head_tiles.py [--tokens 330,1024,2048] [--reps 5] [--out bench/results/head_tiles.json]

The head is SmolLM2-135M's (vocabulary 49,152 x hidden 576, fp32, frozen) on random hidden states
that need a gradient, scored as TRL's SFT trainer asks (log-probabilities, entropy, top-1 hits)
in qlora's CPU tiles (train.small_head_tiles: 1024 tokens x 8192 columns). 330 tokens is the demo
batch of bench/cpu_speed.py (4 x 256, every token trained).
"""
import argparse
import json
import time
from pathlib import Path

import torch
from trl.kernels import ChunkedLogProbFunction

from qlora.speed import CPU_HEAD_TILE, head_tiles_in_place, small_head_tiles

VOCAB, HIDDEN = 49152, 576
OUTPUTS = ("log_probs", "entropy", "is_top1")


def head_pass(hidden, weight, targets, function=ChunkedLogProbFunction) -> tuple:
    """Forward and backward through the head; (seconds, loss, entropy sum, top-1 hits, gradient)."""
    h = hidden.clone().requires_grad_()
    t0 = time.perf_counter()
    logp, entropy, _, _, top1 = function.apply(h, weight, None, targets, 1.0, CPU_HEAD_TILE[1], None, 1.0, OUTPUTS)
    loss = -logp.mean()
    loss.backward()
    return time.perf_counter() - t0, loss.item(), entropy.sum().item(), int(top1.sum()), h.grad


def interleaved(passes: dict, hidden, weight, targets, reps: int) -> tuple:
    """Runs each of `passes` (name -> function of hidden, weight, targets giving head_pass's tuple)
    reps + 1 times, alternating their order; the first round warms up. (seconds by name, last results by name)"""
    names = list(passes)
    times, results = {name: [] for name in names}, {}
    for rep in range(reps + 1):
        for name in (names if rep % 2 else names[::-1]):
            seconds, *results[name] = passes[name](hidden, weight, targets)
            if rep:
                times[name].append(seconds)
    return times, results


def tiles_in_place(in_place: bool):
    """head_pass with train.head_tiles_in_place on or off."""
    def run(hidden, weight, targets):
        with head_tiles_in_place(in_place):
            return head_pass(hidden, weight, targets)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="330,1024,2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results/head_tiles.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN) * 0.05
    rows = []
    print("| tokens | TRL's tiles ms | in place ms | speed-up | same numbers |")
    print("|---|---|---|---|---|")
    for n in map(int, a.tokens.split(",")):
        hidden, targets = torch.randn(n, HIDDEN), torch.randint(0, VOCAB, (n,))
        with small_head_tiles(True):
            times, results = interleaved({False: tiles_in_place(False), True: tiles_in_place(True)},
                                         hidden, weight, targets, a.reps)
        (lt, et, tt, gt), (lo, eo, to, go) = results[False], results[True]
        same = abs(lt - lo) < 1e-5 and abs(et - eo) / abs(et) < 1e-5 and tt == to and \
            torch.allclose(gt, go, rtol=1e-5, atol=1e-8)
        ms = {k: 1e3 * min(v) for k, v in times.items()}
        row = dict(tokens=n, trl_ms=round(ms[False], 1), in_place_ms=round(ms[True], 1),
                   speedup=round(ms[False] / ms[True], 2), same_numbers=same, loss=lt, top1=tt,
                   trl_all_ms=[round(1e3 * x, 1) for x in times[False]],
                   in_place_all_ms=[round(1e3 * x, 1) for x in times[True]])
        rows.append(row)
        print(f"| {n} | {row['trl_ms']} | {row['in_place_ms']} | {row['speedup']}x | {same} |", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(reps=a.reps, tile=CPU_HEAD_TILE, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
