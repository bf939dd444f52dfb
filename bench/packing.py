"""Training throughput on examples of varied lengths, with the same model, data and steps: padded
micro-batches; padding-free ones (data.padding_free: the same examples end to end in one row, each
attending to itself); and packing (data.packing: several examples per row of max_length, so more
examples per step), laid out in rows or in one row.

usage: python bench/packing.py [--model smollm2-135m-instruct] [--steps 4] [--batch 8] [--max-length 256]
                               [--out bench/results/packing.json]

Each case is a separate `qlora train` process; tokens/s is report.json's (non-padding tokens trained
through, over the training loop's seconds). On a GPU pass a larger model and --max-length.
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = ("apple river stone cloud violet engine lantern meadow copper silver harbor willow candle "
         "thunder pepper marble falcon orchard velvet canyon").split()


def varied_rows(n: int, seed: int = 0):
    """'Repeat these words' conversations of 4 to 80 words: a wide spread of lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 80)))
        rows.append({"messages": [{"role": "user", "content": f"Repeat these words: {words}"},
                                  {"role": "assistant", "content": words}]})
    return rows


def run(case: str, overrides, folder: Path) -> dict:
    out = folder / case
    cmd = [sys.executable, "-m", "qlora", "train", *overrides, f"output_dir={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    return {"case": case, **{k: report[k] for k in ("steps", "train_tokens", "train_seconds", "tokens_per_second",
                                                    "peak_memory_gb", "loss_first", "loss_last")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="bench/results/packing.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "varied.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(400)))
        common = [f"model.name_or_path={a.model}", f"data.path={data}", "data.eval_path=null",
                  f"train.max_steps={a.steps}", f"train.per_device_train_batch_size={a.batch}",
                  f"train.max_length={a.max_length}", "train.report_to=[none]", "train.logging_steps=1",
                  "train.save_steps=1000", "eval.exact_match=false"]
        cases = {"padded": ["data.padding_free=false"], "padding-free": ["data.padding_free=true"],
                 "packed": ["data.packing=true", "data.padding_free=false"],
                 "packed-one-row": ["data.packing=true", "data.padding_free=true"]}
        rows = [run(case, common + extra, Path(tmp)) for case, extra in cases.items()]
    base = rows[0]["tokens_per_second"]
    print(f"{'case':<16} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'vs padded':>9} {'peak GB':>8}")
    for r in rows:
        r["over_padded"] = round(r["tokens_per_second"] / base, 3)
        print(f"{r['case']:<16} {r['train_tokens']:>7} {r['train_seconds']:>8.1f} {r['tokens_per_second']:>9.1f} "
              f"{r['over_padded']:>8.2f}x {r['peak_memory_gb']:>8.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
