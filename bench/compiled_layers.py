"""train.compile on CPU: compiled decoder layers against eager ones, in one process, step by step.

This machine's speed drifts by up to 2x within minutes, more than the lever changes, so the two are
interleaved on the same batches (eager then compiled, then the other way round) and summed.

usage: python bench/compiled_layers.py [--batch 4] [--steps 8] [--bf16] [--out bench/results/compiled_layers.json]

The step is SmolLM2-135M's forward and backward on 4-bit weights with LoRA r=8 (every token
trained, as bench/cpu_speed.py's same-loss case), with training's other CPU levers on in both arms
(train.fused_lora, train.fast_dequant), so that the speed-up is what compiling adds to them; the
first compiled step's time is the compilation. --bf16: the 4-bit layers' products in bf16 in both
arms (train.bf16_base_products).
"""
import argparse
import json
import time
from pathlib import Path

from smollm2_cpu import lora_model

from qlora.data import collate_packed
from qlora.dequant import fast_dequant
from qlora.fused_lora import fused_lora
from qlora.speed import compiled_layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="the base's products in bf16")
    ap.add_argument("--out", default="bench/results/compiled_layers.json")
    a = ap.parse_args()
    tok, rows, model = lora_model()

    def step(k: int, compiled: bool):
        batch = collate_packed(rows[a.batch * k:a.batch * (k + 1)], pad_id=tok.pad_token_id)
        with compiled_layers(model, compiled), fused_lora(bf16_base=a.bf16), fast_dequant():
            t = time.perf_counter()
            out = model(**batch, use_cache=False)
            out.loss.backward()
            model.zero_grad()
            return time.perf_counter() - t, out.loss.item(), int((batch["input_ids"] != tok.pad_token_id).sum())

    compile_seconds = step(0, True)[0]
    step(0, False)
    seconds = {False: 0.0, True: 0.0}
    tokens, worst = 0, 0.0
    for k in range(1, a.steps + 1):
        results = {}
        for compiled in ((False, True) if k % 2 else (True, False)):
            results[compiled] = step(k, compiled)
            seconds[compiled] += results[compiled][0]
        tokens += results[True][2]
        worst = max(worst, abs(results[True][1] - results[False][1]))
        print(f"step {k}: eager {results[False][0]:.2f} s, compiled {results[True][0]:.2f} s, "
              f"loss {results[False][1]:.6f} / {results[True][1]:.6f}", flush=True)
    out = dict(batch=a.batch, steps=a.steps, bf16_base_products=a.bf16, compile_seconds=round(compile_seconds, 1),
               eager_tokens_per_second=round(tokens / seconds[False], 1),
               compiled_tokens_per_second=round(tokens / seconds[True], 1),
               speedup=round(seconds[False] / seconds[True], 3), max_loss_difference=worst)
    print(json.dumps(out, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
