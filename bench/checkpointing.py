"""Gradient checkpointing's levers on CPU: speed and peak memory of each, and the planner's estimate.

usage: python bench/checkpointing.py [--batch 4] [--length 512] [--steps 4] [--reps 2]
                                     [--out bench/results/checkpointing.json]

SmolLM2-135M (4-bit, LoRA r=16, every token trained) on rows longer than --length, so that every
micro-batch is as long as the planner plans for. The cases: no checkpointing, every layer
checkpointed (what GPUs get by default), the first 15 and the first 8 of its 30 layers
(train.checkpoint_layers), and every layer with the attention outputs kept (train.checkpoint_attention). Each run is its own
`qlora train` process with one malloc arena (peak RSS then varies least), the cases in turn,
--reps times; the table keeps each case's best speed and highest peak. Warm tokens/s leaves the
first step out. train.offload_checkpoints needs a GPU: bench/gpu_speed.py --set measures it there.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from plots import checkpointing_plot

from qlora.model_shape import model_shape
from qlora.plan import estimate

CASES = {
    "off": ["train.gradient_checkpointing=false"],
    "every layer": ["train.gradient_checkpointing=true"],
    "first 15 layers": ["train.gradient_checkpointing=true", "train.checkpoint_layers=15"],
    "first 8 layers": ["train.gradient_checkpointing=true", "train.checkpoint_layers=8"],
    "every layer, attention kept": ["train.gradient_checkpointing=true", "train.checkpoint_attention=true"],
}


def long_rows(path: Path, n: int, length: int) -> Path:
    words = "apple river stone cloud violet engine lantern meadow copper silver".split()
    text = " ".join(words * (length // 10 + 1))
    rows = [{"messages": [{"role": "user", "content": "Repeat: " + text}, {"role": "assistant", "content": text}]}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(case: str, data: Path, out: Path, a) -> dict:
    cmd = [sys.executable, "-m", "qlora", "train", f"data.path={data}", "data.eval_path=null", "data.loss_on=all",
           "eval.exact_match=false", "train.report_to=[none]", f"train.max_steps={a.steps}", "train.logging_steps=1",
           f"train.per_device_train_batch_size={a.batch}", f"train.max_length={a.length}", f"output_dir={out}",
           *CASES[case]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    if proc.returncode:
        raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    (t0, n0), (t1, n1) = (steps[0]["seconds"], steps[0]["tokens"]), (steps[-1]["seconds"], steps[-1]["tokens"])
    return dict(case=case, tokens_per_second=report["tokens_per_second"], warm_tokens_per_second=(n1 - n0) / (t1 - t0),
                peak_gib=report["peak_memory_gb"], losses=[r["loss"] for r in steps])


def planned(case: str, a) -> float:
    shape, _ = model_shape("smollm2-135m-instruct")
    keys = dict(x.split("=") for x in CASES[case])
    return estimate(shape, r=16, batch=a.batch, max_length=a.length, optim="adamw_torch", device="cpu",
                    checkpointing=keys["train.gradient_checkpointing"] == "true",
                    checkpoint_layers=int(keys["train.checkpoint_layers"]) if "train.checkpoint_layers" in keys else None,
                    checkpoint_attention=keys.get("train.checkpoint_attention") == "true").total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="bench/results/checkpointing.json")
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = long_rows(Path(tmp) / "long.jsonl", 4 * a.batch * a.steps, a.length)
        for rep in range(a.reps):
            for case in CASES:
                r = run(case, data, Path(tmp) / f"{rep}-{len(results)}", a)
                results.append(r)
                print(f"{case:28} rep {rep}: {r['tokens_per_second']:6.1f} tokens/s "
                      f"({r['warm_tokens_per_second']:.1f} warm), peak {r['peak_gib']:.2f} GiB", flush=True)
    base = max(r["warm_tokens_per_second"] for r in results if r["case"] == "every layer")
    summary = []
    print(f"\nSmolLM2-135M, {a.batch} x {a.length} tokens, {a.steps} steps, best of {a.reps}\n"
          f"{'checkpointing':28} {'warm tokens/s':>13} {'vs every layer':>14} {'peak GiB':>9} {'planned':>8} "
          f"{'error':>6}   losses")
    for case in CASES:
        rs = [r for r in results if r["case"] == case]
        warm, peak, plan = max(r["warm_tokens_per_second"] for r in rs), max(r["peak_gib"] for r in rs), planned(case, a)
        summary.append(dict(case=case, warm_tokens_per_second=round(warm, 1), speedup=round(warm / base, 3),
                            peak_gib=peak, planned_gib=round(plan, 3), plan_error=round(plan / peak - 1, 3),
                            losses=[round(x, 4) for x in rs[0]["losses"]]))
        print(f"{case:28} {warm:13.1f} {warm / base:14.2f} {peak:9.2f} {plan:8.2f} {plan / peak - 1:+6.0%}   "
              f"{' '.join(f'{x:.4f}' for x in rs[0]['losses'])}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    result = dict(batch=a.batch, length=a.length, steps=a.steps, reps=a.reps, summary=summary, runs=results)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    checkpointing_plot(result, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
