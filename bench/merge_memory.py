"""Peak memory and time of `qlora merge` (streamed, NF4-dequantized base, self-check included)
against PEFT's merge_and_unload on the same run, each in its own process.

usage: python bench/merge_memory.py RUN_DIR [--out bench/results/merge.json]
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
adapter, out, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
    __import__('json').load(open(adapter + '/adapter_config.json'))['base_model_name_or_path'], dtype=dtype), adapter)
base.merge_and_unload().save_pretrained(out)
"""


def child(cmd):
    """Run a command; its wall time and peak RSS (GiB, from the kernel's accounting of children)."""
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{done.stderr[-2000:]}")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def measured(cmd):
    """(seconds, peak RSS GiB) of one command, run by a fresh interpreter of this script, whose only child it
    is: RUSAGE_CHILDREN keeps the largest child so far."""
    done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(cmd)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default="bench/results/merge.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # each case runs alone in a fresh interpreter of this script (measured), to be fair
        for case in ("peft", "qlora"):
            out = Path(tmp) / case
            if case == "qlora":
                cmd = [sys.executable, "-m", "qlora", "merge", f"adapter={a.run}", f"output_dir={out}",
                       f"merge.dtype={a.dtype}"]
            else:
                cmd = [sys.executable, "-c", PEFT_MERGE, str(Path(a.run) / "adapter"), str(out), a.dtype]
            wall, peak = measured(cmd)
            rows.append(dict(case=case, seconds=round(wall, 1), peak_rss_gib=round(peak, 3)))
    peft, ours = rows
    result = dict(run=a.run, dtype=a.dtype, rows=rows,
                  rss_ratio=round(ours["peak_rss_gib"] / peft["peak_rss_gib"], 3),
                  time_ratio=round(ours["seconds"] / peft["seconds"], 3))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("case  | seconds | peak RSS GiB")
    for r in rows:
        print(f"{r['case']:<5} | {r['seconds']:>7} | {r['peak_rss_gib']}")
    print(f"qlora / peft: RSS x{result['rss_ratio']}, time x{result['time_ratio']}  ({a.out})")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
