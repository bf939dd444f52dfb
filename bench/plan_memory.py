"""`qlora plan` against the peak RSS that training measures on CPU.

usage: python bench/plan_memory.py [--models smollm2,moe] [--runs 3] [--out bench/results/plan_memory.json]

Each case trains two steps with `qlora train`, each run its own process with one malloc arena (peak
RSS then varies least), on rows longer than train.max_length, so that every micro-batch is as long as
the planner plans for; `qlora plan` with the same overrides gives the estimate. The table keeps each
case's lowest and highest peak and compares the estimate with the highest, the memory a user has to
have. smollm2: SmolLM2-135M (LoRA r=16), with and without checkpointing, the base's products in fp32
and in bf16 (train.bf16_base_products; bf16 cases only on CPUs with bf16 units), and LoRA on the
unquantized base (quant.load_in_4bit=false). moe: the random
Qwen3-MoE of bench/moe_experts.py (151M of its 179M weights in experts, saved in bf16; LoRA r=8 on
every linear layer and the experts), experts in 4 bits and in full, with and without checkpointing.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from checkpointing import long_rows
from plots import plan_plot

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.conftest builds the mixture
from tests.conftest import MOE_ON_CPU, make_qwen3_moe  # noqa: E402

SMOLLM2 = [  # (micro-batch, length, checkpointing, bf16 base products, base in 4 bits)
    (8, 256, False, False, True), (8, 256, True, False, True), (8, 256, True, True, True),
    (4, 256, True, True, True), (8, 512, True, True, True), (4, 512, False, True, True),
    (8, 256, True, False, False), (8, 256, False, False, False),
]
MOE = [(4, 256, ckpt, in_4bit) for ckpt in (True, False) for in_4bit in (True, False)]


def cases(models, folder: Path):
    """(label, overrides) of each case."""
    from qlora.fused_lora import cpu_has_bf16_units

    out = []
    if "smollm2" in models:
        for batch, length, ckpt, bf16, in_4bit in SMOLLM2:
            if bf16 and not cpu_has_bf16_units():
                continue
            base = f"{'bf16' if bf16 else 'fp32'} base products" if in_4bit else "unquantized base"
            out.append((f"SmolLM2 {batch} x {length}, checkpointing {'on' if ckpt else 'off'}, {base}",
                        [f"train.per_device_train_batch_size={batch}", f"train.max_length={length}",
                         f"train.gradient_checkpointing={str(ckpt).lower()}",
                         f"train.bf16_base_products={str(bf16).lower()}",
                         f"quant.load_in_4bit={str(in_4bit).lower()}"]))
    if "moe" in models:
        from transformers import AutoTokenizer

        from qlora.models import resolve_model

        model = make_qwen3_moe(folder / "moe", AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct")),
                               **MOE_ON_CPU)
        for batch, length, ckpt, in_4bit in MOE:
            out.append((f"mixture {batch} x {length}, checkpointing {'on' if ckpt else 'off'}, "
                        f"experts {'in 4 bits' if in_4bit else 'in full'}",
                        [f"model.name_or_path={model}", "lora.r=8", "lora.lora_alpha=16",
                         f"train.per_device_train_batch_size={batch}", f"train.max_length={length}",
                         f"train.gradient_checkpointing={str(ckpt).lower()}",
                         f"quant.experts_in_4bit={str(in_4bit).lower()}"]))
    return out


def peak(overrides, data: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "qlora", "train", f"data.path={data}", "data.eval_path=null", "data.loss_on=all",
           "eval.exact_match=false", "train.report_to=[none]", "train.max_steps=2", f"output_dir={out}",
           "overwrite=true", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text())["peak_memory_gb"]


def planned(overrides, data: Path) -> float:
    proc = subprocess.run([sys.executable, "-m", "qlora", "plan", f"data.path={data}", *overrides],
                          capture_output=True, text=True, check=True)
    return float(re.search(r"estimated peak +([0-9.]+) GiB", proc.stdout).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,moe")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/plan_memory.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = long_rows(tmp / "long.jsonl", 32, 512)
        for label, overrides in cases(a.models.split(","), tmp):
            peaks = [peak(overrides, data, tmp / "run") for _ in range(a.runs)]
            plan = planned(overrides, data)
            rows.append(dict(case=label, overrides=overrides, peaks_gib=peaks, peak_gib=max(peaks),
                             planned_gib=plan, plan_error=plan / max(peaks) - 1))
            print(f"{label}: measured {min(peaks):.2f}-{max(peaks):.2f} GiB, planned {plan:.2f} "
                  f"({plan / max(peaks) - 1:+.0%})", flush=True)
    result = dict(runs=a.runs, rows=rows)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print("\n| case | measured GiB | planned GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {min(r['peaks_gib']):.2f}-{r['peak_gib']:.2f} | {r['planned_gib']:.2f} "
              f"({r['plan_error']:+.0%}) |")
    plan_plot(result, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
