"""Greedy generation speed (new tokens per second, batch 1) of a run: 4-bit base + adapter, and its
merged model loaded unquantized, in the same process.

usage: python bench/generation_speed.py RUN_DIR MERGED_DIR [--tokens 64] [--out bench/results/generation.json]
"""
import argparse
import json
import time
from pathlib import Path

PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a bicycle works to a ten-year-old."]


def speed(model, tokenizer, n_tokens):
    import torch

    rates = []
    for p in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        t = time.perf_counter()
        with torch.no_grad():  # no stop tokens: always n_tokens new tokens
            out = model.generate(**ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        rates.append((out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t))
    return round(sum(rates) / len(rates), 2)


def main():
    from qlora.cli import compose
    from qlora.inference import load_for_inference

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("merged")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/results/generation.json")
    a = ap.parse_args()
    cases = {"4-bit base + adapter": [f"adapter={a.run}"],
             "merged, unquantized": [f"model.name_or_path={a.merged}", "quant=none"],
             "merged, re-quantized 4-bit on load": [f"model.name_or_path={a.merged}"]}
    rows = []
    for name, overrides in cases.items():
        loaded = load_for_inference(compose("train", overrides))
        rows.append(dict(case=name, tokens_per_second=speed(loaded.model, loaded.tokenizer, a.tokens),
                         device=loaded.device, dtype=str(next(loaded.model.parameters()).dtype)))
        print(rows[-1], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(run=a.run, new_tokens=a.tokens, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
