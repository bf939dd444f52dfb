"""quant.experts_in_4bit on CPU: a mixture of experts trained with its experts in 4 bits and in full.

usage: python bench/moe_experts.py [--steps 6] [--reps 2] [--out bench/results/moe_experts.json]

A random Qwen3-MoE saved in bf16 (4 layers, hidden 512, 32 experts of 768 a layer, 4 a token: 151M
expert weights, 0.56 GiB in fp32) with SmolLM2's tokenizer, trained on the demo rows by `qlora train`
(LoRA r=8 on every linear layer and on the experts, micro-batch 4 x 256), with and without gradient
checkpointing. Each run is its own process with one malloc arena; the cases in turn, --reps times;
the table keeps each case's best speed and highest peak RSS, with the planner's estimate beside it
and the loss curves.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qlora.plan import estimate, model_file_gb, model_shape

CASES = {
    "experts in 4 bits, checkpointed": ["quant.experts_in_4bit=true", "train.gradient_checkpointing=true"],
    "experts in full, checkpointed": ["quant.experts_in_4bit=false", "train.gradient_checkpointing=true"],
    "experts in 4 bits, no checkpointing": ["quant.experts_in_4bit=true", "train.gradient_checkpointing=false"],
    "experts in full, no checkpointing": ["quant.experts_in_4bit=false", "train.gradient_checkpointing=false"],
}
BATCH, LENGTH = 4, 256


def moe_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qlora.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=32,
                         num_experts_per_tok=4, moe_intermediate_size=768, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)  # as checkpoints are shipped
    tok.save_pretrained(folder)
    return folder


def run(case: str, model: Path, out: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "qlora", "train", f"model.name_or_path={model}", "data.eval_path=null",
           "data.loss_on=all", "eval.exact_match=false", "train.report_to=[none]", f"train.max_steps={steps}",
           "train.logging_steps=1", f"train.per_device_train_batch_size={BATCH}", f"train.max_length={LENGTH}",
           "lora.r=8", "lora.lora_alpha=16", f"output_dir={out}", *CASES[case]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    if proc.returncode:
        raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return dict(case=case, tokens_per_second=report["tokens_per_second"], peak_gib=report["peak_memory_gb"],
                losses=losses)


def planned(case: str, model: Path) -> float:
    shape, folder = model_shape(str(model))
    keys = dict(x.split("=") for x in CASES[case])
    return estimate(shape, r=8, batch=BATCH, max_length=LENGTH, optim="adamw_torch", device="cpu",
                    model_file_gb=model_file_gb(folder),
                    checkpointing=keys["train.gradient_checkpointing"] == "true",
                    experts_in_4bit=keys["quant.experts_in_4bit"] == "true").total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="bench/results/moe_experts.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = moe_model(Path(tmp) / "moe")
        results = {case: [] for case in CASES}
        for rep in range(a.reps):
            for i, case in enumerate(CASES):
                results[case].append(run(case, model, Path(tmp) / f"run-{rep}-{i}", a.steps))
                print(f"  {case}: {results[case][-1]['tokens_per_second']:.0f} tokens/s, "
                      f"{results[case][-1]['peak_gib']:.2f} GiB", flush=True)
        rows = [dict(case=case, tokens_per_second=max(r["tokens_per_second"] for r in runs),
                     peak_gib=max(r["peak_gib"] for r in runs), planned_gib=planned(case, model),
                     losses=runs[0]["losses"]) for case, runs in results.items()]
    print(f"\n{'case':38} {'tokens/s':>9} {'peak RSS GiB':>13} {'planned':>8}  losses")
    for r in rows:
        print(f"{r['case']:38} {r['tokens_per_second']:9.0f} {r['peak_gib']:13.2f} {r['planned_gib']:8.2f}  "
              + " ".join(f"{x:.4f}" for x in r["losses"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(steps=a.steps, reps=a.reps, batch=BATCH, length=LENGTH, rows=rows),
                                      indent=2) + "\n")
    print(f"\nresults: {a.out}")


if __name__ == "__main__":
    main()
