"""train.fused_lora on CPU: SmolLM2's decoder layers (4-bit base, LoRA r=8 on every linear layer),
forward and backward, through PEFT's LoRA forward and through qlora's LoraMatmul4bit, alternating
in one process (this machine's speed drifts more between processes than the lever changes it).

usage: python bench/fused_lora.py [--rows 4,12] [--steps 12] [--out bench/results/fused_lora.json]
       python bench/fused_lora.py --joint [--out bench/results/fused_lora_joint.json]

Each pass runs the decoder stack on the demo's first rows (padded to the longest) and backpropagates
a loss on its last hidden states; the LM head is left out (the lever does not touch it). The first
two passes of each kind are warm-up; the table gives medians of the rest.

--joint compares, both with train.fused_lora and train.fast_dequant, the base weight and LoRA A
multiplied apart (two products) and as one (our kernel dequantizing W above A's rows).
"""
import argparse
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

from smollm2_cpu import decoder_pass, lora_model

from qlora import dequant
from qlora.data import collate_packed
from qlora.dequant import fast_dequant
from qlora.fused_lora import fused_lora


@contextmanager
def joint_product(joint: bool):
    """With fused_lora and fast_dequant: the base weight and LoRA A as one product, or apart."""
    real = dequant.weight_and_rows
    dequant.weight_and_rows = real if joint else (lambda *a: None)
    try:
        with fused_lora(), fast_dequant():
            yield
    finally:
        dequant.weight_and_rows = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="4,12")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--joint", action="store_true", help="one product for W and LoRA A, against two")
    ap.add_argument("--out")
    a = ap.parse_args()
    names = ("apart", "joint") if a.joint else ("PEFT", "fused")
    lever = joint_product if a.joint else fused_lora
    out = a.out or f"bench/results/fused_lora{'_joint' if a.joint else ''}.json"
    tokenizer, rows, model = lora_model()
    results = []
    print(f"{'rows':>4} {'tokens':>6} {names[0] + ' s':>7} {names[1] + ' s':>7} {'speed-up':>8}   per-pair speed-ups")
    for n in map(int, a.rows.split(",")):
        batch = collate_packed(rows[:n], pad_id=tokenizer.pad_token_id)
        tokens = int((batch["input_ids"] != tokenizer.pad_token_id).sum())
        seconds = {True: [], False: []}
        for step in range(a.steps):
            for on in ((False, True) if step % 2 else (True, False)):
                with lever(on):
                    seconds[on].append(decoder_pass(model, batch))
        model.zero_grad(set_to_none=True)
        off_s, on_s = (statistics.median(seconds[k][2:]) for k in (False, True))
        pairs = [round(p / f, 3) for p, f in zip(seconds[False][2:], seconds[True][2:])]
        results.append({"rows": n, "tokens": tokens, f"{names[0].lower()}_seconds": round(off_s, 4),
                        f"{names[1]}_seconds": round(on_s, 4), "speedup": round(off_s / on_s, 3),
                        "median_pair_speedup": round(statistics.median(pairs), 3), "pair_speedups": pairs})
        print(f"{n:4} {tokens:6} {off_s:7.3f} {on_s:7.3f} {off_s / on_s:7.2f}x   "
              f"{min(pairs):.2f}-{max(pairs):.2f} (median pair {statistics.median(pairs):.3f}x)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(steps=a.steps, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
