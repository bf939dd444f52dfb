"""gen.bf16_base_products on CPU: a run's held-out evaluation (greedy answers in batches, as exact match
makes them, and the held-out loss) with the 4-bit layers' products in fp32 and in bf16, alternating in
one process; the answers and losses of the two compared.

usage: python bench/inference_bf16.py RUN_DIR [--batch 25] [--reps 2] [--out bench/results/inference_bf16.json]

RUN_DIR is a trained run (`qlora train recipe=smollm2_demo` makes one); its held-out data is used.
"""
import argparse
import json
import time
from pathlib import Path


def main():
    from qlora.cli import compose
    from qlora.config import GenConfig
    from qlora.data import DataStats, prompt_and_answer, tokenize_examples
    from qlora.dequant import use_for_inference
    from qlora.evaluate import held_out_of_run, mean_loss
    from qlora.generate import generate_answers
    from qlora.inference import load_for_inference

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="bench/results/inference_bf16.json")
    a = ap.parse_args()
    cfg = compose("train", [f"adapter={a.run}"])
    examples, trained, _ = held_out_of_run(cfg)
    loaded = load_for_inference(cfg)
    prompts, refs = zip(*(prompt_and_answer(ex) for ex in examples))
    rows = tokenize_examples(loaded.tokenizer, examples, trained.data, trained.train.max_length, DataStats())
    seconds = {k: {"generate": [], "loss": []} for k in ("fp32", "bf16")}
    answers, losses = {}, {}
    for rep in range(a.reps):
        for kind in (("fp32", "bf16") if rep % 2 == 0 else ("bf16", "fp32")):
            use_for_inference(True, bf16=kind == "bf16")
            began = time.perf_counter()
            answers[kind] = generate_answers(loaded.model, loaded.tokenizer, list(prompts), GenConfig(do_sample=False),
                                             max_new_tokens=trained.eval.max_new_tokens, batch_size=a.batch)
            seconds[kind]["generate"].append(time.perf_counter() - began)
            began = time.perf_counter()
            losses[kind] = mean_loss(loaded.model, rows, 8)
            seconds[kind]["loss"].append(time.perf_counter() - began)
    result = {"run": a.run, "examples": len(examples), "batch": a.batch, "reps": a.reps, "cases": {}}
    for kind in ("fp32", "bf16"):
        em = sum(x == r.strip() for x, r in zip(answers[kind], refs)) / len(refs)
        result["cases"][kind] = {"generate_s": [round(s, 2) for s in seconds[kind]["generate"]],
                                 "loss_s": [round(s, 2) for s in seconds[kind]["loss"]],
                                 "exact_match": em, "loss": round(losses[kind], 6)}
    result["same_answers"] = sum(x == y for x, y in zip(answers["fp32"], answers["bf16"]))
    best = {k: {m: min(v) for m, v in seconds[k].items()} for k in seconds}
    result["speedup_generate"] = round(best["fp32"]["generate"] / best["bf16"]["generate"], 2)
    result["speedup_loss"] = round(best["fp32"]["loss"] / best["bf16"]["loss"], 2)
    print(f"{len(examples)} held-out examples, greedy answers in batches of {a.batch}, {a.reps} repetitions")
    print(f"{'products':>8} {'generate s':>16} {'loss s':>14} {'exact match':>11} {'loss':>9}")
    for kind, c in result["cases"].items():
        print(f"{kind:>8} {', '.join(map(str, c['generate_s'])):>16} {', '.join(map(str, c['loss_s'])):>14} "
              f"{c['exact_match']:11.2f} {c['loss']:9.6f}")
    print(f"bf16: generation {result['speedup_generate']}x, loss {result['speedup_loss']}x (best of each); "
          f"{result['same_answers']} of {len(examples)} answers the same")
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
