"""qlora against the plain stack on CPU: same model, data, batch and steps, side by side.

The plain stack is transformers + bitsandbytes + PEFT + TRL as a user writes it (issue 7):
BitsAndBytesConfig(nf4, double quant, compute float32), LoraConfig(r=8, lora_alpha=16,
target_modules="all-linear"), SFTConfig(use_cpu=True, bf16=False, fp16=False, max_length=256,
per_device_train_batch_size=4) and otherwise TRL's defaults (which cast LoRA to bf16 and turn on
gradient checkpointing). qlora runs the same model, rows, LoRA shape, batch and optimizer settings
(TRL's learning rate and schedule), training every token (data.loss_on=all) as the plain stack
does, so the two loss curves compare; everything else is qlora's defaults.

usage: python bench/cpu_speed.py [--models smollm2,tiny] [--cases plain,qlora,...] [--steps 8] [--reps 2]
                                 [--out bench/results/cpu_speed.json]

Each case runs in its own process, `--reps` times, alternating. tokens/s = non-padding tokens
trained through / seconds of the training loop; "warm" tokens/s leaves the first step out (it holds
train.compile's compilation, and the first-call costs of every case); peak = the process's peak RSS.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plots import speed_plot

from qlora.tracking import peak_memory_gb

LORA = dict(r=8, lora_alpha=16)
# plain: the baseline; qlora: the same loss as the baseline (every token); qlora-compiled: the same
# with train.compile=true (which auto leaves off for runs this short); qlora-assistant: qlora's default
# loss (assistant tokens only, as chat fine-tuning should), whose loss curve differs by design
CASES = ("plain", "qlora", "qlora-compiled", "qlora-assistant")
# one lever off, for what it contributes (--cases qlora,qlora-trl-head-tiles): TRL's own head tiles;
# PEFT's own LoRA forward; TRL's two passes over the head; bitsandbytes' dequantization; padded micro-batches
# (eager or compiled; the later of two overrides of a key wins); bf16 compute (CPUs with bf16 units);
# the base's products in fp32 where train.bf16_base_products would multiply them in bf16; the LM head's
# products alone in fp32 under that lever (no key for it: fp32_head() below)
EXTRA_CASES = {"qlora-trl-head-tiles": ["train.head_tiles_in_place=false"],
               "qlora-peft-lora": ["train.fused_lora=false"],
               "qlora-two-pass-head": ["train.head_one_pass=false"],
               "qlora-bnb-dequant": ["train.fast_dequant=false"],
               "qlora-padded": ["data.padding_free=false"],
               "qlora-compiled-padded": ["train.compile=true", "data.padding_free=false"],
               "qlora-bf16": ["quant.bnb_4bit_compute_dtype=bfloat16"],
               "qlora-fp32-base": ["train.bf16_base_products=false"],
               "qlora-fp32-head": []}


def tiny_model(folder: Path) -> Path:
    """A random 4-layer Llama (hidden 256) with SmolLM2's tokenizer: the shape of a small model, fast."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def plain_stack(model_path: str, data: str, steps: int, out: str) -> dict:
    """The baseline, written as the documentation of each library suggests."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = load_dataset("json", data_files=data, split="train")
    losses, clock = [], {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["begin"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
                clock["tokens"] = logs.get("num_tokens", clock.get("tokens"))
                clock.setdefault("series", []).append((time.perf_counter() - clock["begin"], clock["tokens"]))

    args = SFTConfig(output_dir=out, use_cpu=True, bf16=False, fp16=False, max_length=256,
                     per_device_train_batch_size=4, max_steps=steps, logging_steps=1, report_to="none",
                     save_strategy="no", seed=42)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA),
                         callbacks=[Clock()])
    trainer.train()
    seconds = clock["end"] - clock["begin"]
    return dict(tokens=int(clock["tokens"]), seconds=seconds, losses=losses, series=clock["series"])


def qlora(model_path: str, data: str, steps: int, out: str, loss_on: str = "all", compile: bool = False,
          extra: tuple = ()) -> dict:
    from qlora.cli import compose
    from qlora.train import fit

    cfg = compose("train", [f"model.name_or_path={model_path}", f"data.path={data}", "data.eval_path=null",
                            f"data.loss_on={loss_on}", f"lora.r={LORA['r']}", f"lora.lora_alpha={LORA['lora_alpha']}",
                            "train.per_device_train_batch_size=4", "train.max_length=256", f"train.max_steps={steps}",
                            "train.logging_steps=1", "train.save_steps=100000", "train.report_to=[none]",
                            # TRL's defaults, so that the loss curves compare
                            "train.learning_rate=2e-5", "train.lr_scheduler_type=linear", "train.warmup_ratio=0",
                            "train.max_grad_norm=1.0",
                            f"train.compile={str(compile).lower()}", "eval.exact_match=false", f"output_dir={out}",
                            *extra])
    run = fit(cfg)
    lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return dict(tokens=run.report["train_tokens"], seconds=run.report["train_seconds"],
                losses=[r["loss"] for r in lines if "loss" in r],
                series=[(r["seconds"], r["tokens"]) for r in lines if "loss" in r])


def fp32_head() -> None:
    """From now on in this process, the LM head's products stay fp32 under train.bf16_base_products
    (whose 4-bit layers' products are still made in bf16): what the head's part of the lever brings."""
    import qlora.one_pass_head as head

    both = head.head_one_pass
    head.head_one_pass = lambda enabled=True, bf16_products=False: both(enabled, False)


def one_case(case: str, model_path: str, data: str, steps: int) -> None:
    """Child process: run one case and print its result as the last line."""
    if case == "qlora-fp32-head":
        fp32_head()
    with tempfile.TemporaryDirectory() as out:
        if case == "qlora-assistant":
            r = qlora(model_path, data, steps, out, loss_on="assistant")
        elif case == "qlora-compiled":
            r = qlora(model_path, data, steps, out, compile=True)
        elif case in EXTRA_CASES:
            r = qlora(model_path, data, steps, out, extra=EXTRA_CASES[case])
        else:
            r = {"plain": plain_stack, "qlora": qlora}[case](model_path, data, steps, out)
    r["peak_rss_gb"] = peak_memory_gb("cpu")  # this process's own peak, not its launcher's (qlora.tracking)
    print("RESULT " + json.dumps(r), flush=True)


def run_case(case, model_path, data, steps) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--model-path", model_path, "--data", data,
           "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,tiny")
    ap.add_argument("--cases", default=",".join(CASES), help="the first is the ratios' baseline; besides "
                    f"{', '.join(CASES)}: {', '.join(EXTRA_CASES)}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="bench/results/cpu_speed.json")
    ap.add_argument("--child")
    ap.add_argument("--model-path")
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.child:
        return one_case(a.child, a.model_path, a.data, a.steps)
    cases = a.cases.split(",")
    baseline = cases[0]  # the ratios' denominator

    from qlora.models import resolve_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(__file__).resolve().parents[1] / "qlora" / "demo" / "people_train.jsonl")
        for name in a.models.split(","):
            path = resolve_model("smollm2-135m-instruct") if name == "smollm2" else str(tiny_model(Path(tmp) / "tiny"))
            for rep in range(a.reps):
                for case in cases:
                    r = run_case(case, path, data, a.steps)
                    (t0, n0), (t1, n1) = r["series"][0], r["series"][-1]
                    r.update(model=name, case=case, rep=rep, tokens_per_second=r["tokens"] / r["seconds"],
                             warm_tokens_per_second=(n1 - n0) / (t1 - t0))
                    results.append(r)
                    print(f"{name:8} {case:20} rep {rep}: {r['tokens_per_second']:7.1f} tokens/s "
                          f"({r['warm_tokens_per_second']:.1f} warm), {r['seconds'] / a.steps:6.2f} s/step, "
                          f"peak {r['peak_rss_gb']:.2f} GB", flush=True)
    print(f"\n{'model':8} {'case':20} {'tokens/s':>9} {'s/step':>7} {'peak GB':>8} {'ratio':>6} {'warm':>8} "
          f"{'ratio':>6}   losses (first, last)")
    summary = []
    for name in a.models.split(","):
        best = {}
        for case in cases:
            rs = [r for r in results if r["model"] == name and r["case"] == case]
            best[case] = max(rs, key=lambda r: r["tokens_per_second"])  # the best of the repetitions
        for case in cases:
            r = best[case]
            ratio = r["tokens_per_second"] / best[baseline]["tokens_per_second"]
            warm = max(x["warm_tokens_per_second"] for x in results if x["model"] == name and x["case"] == case)
            warm_base = max(x["warm_tokens_per_second"] for x in results
                             if x["model"] == name and x["case"] == baseline)
            summary.append(dict(model=name, case=case, tokens_per_second=round(r["tokens_per_second"], 2),
                                seconds_per_step=round(r["seconds"] / a.steps, 3), peak_rss_gb=round(r["peak_rss_gb"], 3),
                                ratio=round(ratio, 2), warm_tokens_per_second=round(warm, 2),
                                warm_ratio=round(warm / warm_base, 2), losses=[round(x, 4) for x in r["losses"]]))
            print(f"{name:8} {case:20} {r['tokens_per_second']:9.1f} {r['seconds'] / a.steps:7.2f} "
                  f"{r['peak_rss_gb']:8.2f} {ratio:6.2f} {warm:8.1f} {warm / warm_base:6.2f}   "
                  f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    result = dict(steps=a.steps, reps=a.reps, baseline=baseline, summary=summary, runs=results)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    speed_plot(result, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
