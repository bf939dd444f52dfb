"""train.fused_lora on CPU: SmolLM2's decoder layers (4-bit base, LoRA r=8 on every linear layer),
forward and backward, through PEFT's LoRA forward and through qlora's LoraMatmul4bit, alternating
in one process (this machine's speed drifts more between processes than the lever changes it).

usage: python bench/fused_lora.py [--rows 4,12] [--steps 12] [--out bench/results/fused_lora.json]

Each pass runs the decoder stack on the demo's first rows (padded to the longest) and backpropagates
a loss on its last hidden states; the LM head is left out (the lever does not touch it). The first
two passes of each kind are warm-up; the table gives medians of the rest.
"""
import argparse
import json
import statistics
from pathlib import Path

from smollm2_cpu import decoder_pass, lora_model

from qlora.data import collate_packed
from qlora.fused_lora import fused_lora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="4,12")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="bench/results/fused_lora.json")
    a = ap.parse_args()
    tokenizer, rows, model = lora_model()
    results = []
    print(f"{'rows':>4} {'tokens':>6} {'PEFT s':>7} {'fused s':>7} {'speed-up':>8}   per-pair speed-ups")
    for n in map(int, a.rows.split(",")):
        batch = collate_packed(rows[:n], pad_id=tokenizer.pad_token_id)
        tokens = int((batch["input_ids"] != tokenizer.pad_token_id).sum())
        seconds = {True: [], False: []}
        for step in range(a.steps):
            for fused in ((False, True) if step % 2 else (True, False)):
                with fused_lora(fused):
                    seconds[fused].append(decoder_pass(model, batch))
        model.zero_grad(set_to_none=True)
        peft_s, fused_s = (statistics.median(seconds[k][2:]) for k in (False, True))
        pairs = [round(p / f, 3) for p, f in zip(seconds[False][2:], seconds[True][2:])]
        results.append(dict(rows=n, tokens=tokens, peft_seconds=round(peft_s, 4),
                            fused_seconds=round(fused_s, 4), speedup=round(peft_s / fused_s, 3), pair_speedups=pairs))
        print(f"{n:4} {tokens:6} {peft_s:7.3f} {fused_s:7.3f} {peft_s / fused_s:7.2f}x   "
              f"{min(pairs):.2f}-{max(pairs):.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(steps=a.steps, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
