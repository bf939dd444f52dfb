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
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="4,12")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="bench/results/fused_lora.json")
    a = ap.parse_args()

    import torch

    from qlora.adapters import attach_lora
    from qlora.cli import compose
    from qlora.data import DataStats, read_examples, tokenize_examples
    from qlora.fused_lora import fused_lora
    from qlora.models import load_base_model, load_tokenizer, resolve_model

    cfg = compose("train", ["lora.r=8", "lora.lora_alpha=16", "data.loss_on=all"])
    path = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path, cfg.model)
    model = attach_lora(load_base_model(path, cfg.model, cfg.quant, "cpu", torch.float32), cfg.lora, False)
    model.train()
    decoder = model.get_base_model().model
    examples = read_examples(cfg.data.path, cfg.data)
    results = []
    print(f"{'rows':>4} {'tokens':>6} {'PEFT s':>7} {'fused s':>7} {'speed-up':>8}   per-pair speed-ups")
    for n in map(int, a.rows.split(",")):
        rows = tokenize_examples(tokenizer, examples[:n], cfg.data, 256, DataStats())
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * (width - len(r["input_ids"])) for r in rows])
        mask = (torch.arange(width)[None] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
        seconds = {True: [], False: []}
        for step in range(a.steps):
            for fused in ((False, True) if step % 2 else (True, False)):
                start = time.perf_counter()
                with fused_lora(fused):
                    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    hidden.square().mean().backward()
                seconds[fused].append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        peft, fused = (statistics.median(seconds[k][2:]) for k in (False, True))
        pairs = [round(p / f, 3) for p, f in zip(seconds[False][2:], seconds[True][2:])]
        results.append(dict(rows=n, tokens=int(mask.sum()), peft_seconds=round(peft, 4), fused_seconds=round(fused, 4),
                            speedup=round(peft / fused, 3), pair_speedups=pairs))
        print(f"{n:4} {int(mask.sum()):6} {peft:7.3f} {fused:7.3f} {peft / fused:7.2f}x   "
              f"{min(pairs):.2f}-{max(pairs):.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(steps=a.steps, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
