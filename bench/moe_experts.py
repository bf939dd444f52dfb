"""quant.experts_in_4bit: a mixture of experts trained with its experts in 4 bits and in full.

usage: python bench/moe_experts.py [--size cpu|gpu] [--steps 6] [--reps 2] [--out bench/results/moe_experts.json]

--size cpu: a random Qwen3-MoE saved in bf16 (4 layers, hidden 512, 32 experts of 768 a layer, 4 a
token: 151M expert weights, 0.56 GiB in fp32) with SmolLM2's tokenizer, micro-batch 4 x 256.
--size gpu: 8 layers, hidden 2048, 64 experts of 768, 8 a token (2.4B expert weights, 4.5 GiB in
bf16) with the tests' small tokenizer (a GPU machine has no SmolLM2), micro-batch 4 x 1024.
Trained on the demo rows by `qlora train` (LoRA r=8 on every linear layer and on the experts), with
and without gradient checkpointing. Each run is its own process with one malloc arena; the cases in
turn, --reps times; the table keeps each case's best speed and highest peak memory (RSS on CPU, the
CUDA peak on a GPU), with the planner's estimate beside it and the loss curves. Then greedy
decoding in this process (interleaved, best of --reps + 1): the 4-bit experts with only the routed
ones dequantized, as qlora does without gradient, with every expert dequantized, and held in full;
and with LoRA on them, held in 4 bits and in full, added by qlora and through PEFT's parametrization.
Last, a training step's forward and backward with LoRA on the experts, both ways, interleaved.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.conftest builds the model
from qlora.model_shape import model_shape  # noqa: E402
from qlora.plan import estimate  # noqa: E402
from tests.conftest import MOE_ON_CPU, experts_lora_ways, make_qwen3_moe, make_tokenizer  # noqa: E402

CASES = {
    "experts in 4 bits, checkpointed": ["quant.experts_in_4bit=true", "train.gradient_checkpointing=true"],
    "experts in full, checkpointed": ["quant.experts_in_4bit=false", "train.gradient_checkpointing=true"],
    "experts in 4 bits, no checkpointing": ["quant.experts_in_4bit=true", "train.gradient_checkpointing=false"],
    "experts in full, no checkpointing": ["quant.experts_in_4bit=false", "train.gradient_checkpointing=false"],
}
SIZES = {  # the model's own settings, the micro-batch
    "cpu": (MOE_ON_CPU, (4, 256)),
    "gpu": (dict(hidden_size=2048, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=8,
                 moe_intermediate_size=768), (4, 1024)),
}


def moe_model(folder: Path, size: str) -> Path:
    from transformers import AutoTokenizer

    from qlora.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct")) if size == "cpu" else make_tokenizer()
    return make_qwen3_moe(folder, tok, **SIZES[size][0])


def run(case: str, model: Path, out: Path, steps: int, batch: int, length: int) -> dict:
    cmd = [sys.executable, "-m", "qlora", "train", f"model.name_or_path={model}", "data.eval_path=null",
           "data.loss_on=all", "eval.exact_match=false", "train.report_to=[none]", f"train.max_steps={steps}",
           "train.logging_steps=1", f"train.per_device_train_batch_size={batch}", f"train.max_length={length}",
           "lora.r=8", "lora.lora_alpha=16", f"output_dir={out}", *CASES[case]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    if proc.returncode:
        raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return dict(case=case, tokens_per_second=report["tokens_per_second"], peak_gib=report["peak_memory_gb"],
                losses=losses)


def planned(case: str, model: Path, batch: int, length: int) -> float:
    import torch

    from qlora.fused_lora import cpu_has_bf16_units

    shape, _ = model_shape(str(model))
    keys = dict(x.split("=") for x in CASES[case])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpointing = keys["train.gradient_checkpointing"] == "true"
    return estimate(shape, r=8, batch=batch, max_length=length, optim="adamw_torch", device=device,
                    checkpointing=checkpointing, experts_in_4bit=keys["quant.experts_in_4bit"] == "true",
                    # as `qlora plan` counts train.bf16_base_products=auto (on such CPUs, with checkpointing)
                    bf16_products=device == "cpu" and checkpointing and cpu_has_bf16_units()).total


def with_lora(model: Path, in_4bit: bool, checkpointing: bool, device: str, dtype):
    """The mixture with LoRA (r=8, B random) on every linear layer and the experts, and the function that
    chooses how LoRA on the experts is added: choose("qlora") or choose("peft")."""
    import torch

    from qlora.adapters import attach_lora
    from qlora.cli import compose
    from qlora.models import load_base_model

    cfg = compose("train", [f"model.name_or_path={model}", f"quant.experts_in_4bit={str(in_4bit).lower()}"])
    base = load_base_model(str(model), cfg.model, cfg.quant, device, dtype)
    torch.manual_seed(0)
    lora = attach_lora(base, cfg.lora, checkpointing, compute_dtype=dtype)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return lora, experts_lora_ways(lora)[0]


def generation(model: Path, new_tokens: int, rounds: int) -> list:
    """Greedy decoding tokens/s, in this process and interleaved: the experts in 4 bits with only a token's
    routed experts dequantized (qlora's way without gradient), with every expert dequantized at each
    token, and held in full; then with LoRA on them, held in 4 bits and in full, added by qlora (into
    the routed experts only) and through PEFT's parametrization (into a copy of every expert)."""
    import time

    import torch

    import qlora.experts_4bit as experts_4bit
    from qlora.cli import compose
    from qlora.models import load_base_model, pick_device

    device = pick_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models, ways = {}, []
    for in_4bit in (True, False):
        cfg = compose("train", [f"model.name_or_path={model}", f"quant.experts_in_4bit={str(in_4bit).lower()}"])
        models[in_4bit] = load_base_model(str(model), cfg.model, cfg.quant, device, dtype).eval()
        models[in_4bit, "lora"], choose = with_lora(model, in_4bit, False, device, dtype)
        models[in_4bit, "lora"].eval()
        ways.append(choose)
    routed, every = experts_4bit.slices_by_expert, (lambda packed: False)
    cases = {"4 bits, routed experts dequantized": (True, routed, True),
             "4 bits, every expert dequantized": (True, every, True),
             "experts in full": (False, routed, True),
             "4 bits + LoRA, added by qlora": ((True, "lora"), routed, True),
             "4 bits + LoRA through PEFT": ((True, "lora"), routed, False),
             "in full + LoRA, added by qlora": ((False, "lora"), routed, True),
             "in full + LoRA through PEFT": ((False, "lora"), routed, False)}
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    best = {case: 0.0 for case in cases}
    for _ in range(rounds):
        for case, (key, slices, qlora) in cases.items():
            experts_4bit.slices_by_expert = slices
            for choose in ways:
                choose("qlora" if qlora else "peft")
            start = time.perf_counter()
            with torch.no_grad():
                models[key].generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            if device == "cuda":
                torch.cuda.synchronize()
            best[case] = max(best[case], new_tokens / (time.perf_counter() - start))
    experts_4bit.slices_by_expert = routed
    return [dict(case=case, tokens_per_second=v) for case, v in best.items()]


def lora_steps(model: Path, batch: int, length: int, rounds: int) -> list:
    """A training step's forward and backward with LoRA on the experts (held in 4 bits and in full, with
    and without checkpointing), in this process and interleaved: added by qlora and through PEFT's
    parametrization. Seconds a step, best of rounds, and the largest difference between the two ways'
    LoRA gradients."""
    import time

    import torch

    from qlora.models import pick_device

    device = pick_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for in_4bit in (True, False):
        for checkpointing in (True, False):
            lora, choose = with_lora(model, in_4bit, checkpointing, device, dtype)
            lora.train()
            best, grads = {True: float("inf"), False: float("inf")}, {}
            for _ in range(rounds):
                for qlora in (True, False):
                    choose("qlora" if qlora else "peft")
                    lora.zero_grad()
                    start = time.perf_counter()
                    lora(input_ids=ids, labels=ids).loss.backward()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    best[qlora] = min(best[qlora], time.perf_counter() - start)
                    grads[qlora] = [p.grad.float() for p in lora.parameters() if p.requires_grad]
            differs = max((a - b).abs().max().item() for a, b in zip(grads[True], grads[False]))
            rows.append(dict(experts_in_4bit=in_4bit, checkpointing=checkpointing, qlora_s=best[True],
                             peft_s=best[False], largest_gradient_difference=differs))
            del lora, choose
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy decoding's length")
    ap.add_argument("--out", default="bench/results/moe_experts.json")
    a = ap.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = moe_model(Path(tmp) / "moe", a.size)
        batch, length = SIZES[a.size][1]
        results = {case: [] for case in CASES}
        for rep in range(a.reps):
            for i, case in enumerate(CASES):
                results[case].append(run(case, model, Path(tmp) / f"run-{rep}-{i}", a.steps, batch, length))
                print(f"  {case}: {results[case][-1]['tokens_per_second']:.0f} tokens/s, "
                      f"{results[case][-1]['peak_gib']:.2f} GiB", flush=True)
        rows = [dict(case=case, tokens_per_second=max(r["tokens_per_second"] for r in runs),
                     peak_gib=max(r["peak_gib"] for r in runs), planned_gib=planned(case, model, batch, length),
                     losses=runs[0]["losses"]) for case, runs in results.items()]
        print(f"\n{'case':38} {'tokens/s':>9} {'peak GiB':>9} {'planned':>8}  losses")
        for r in rows:
            print(f"{r['case']:38} {r['tokens_per_second']:9.0f} {r['peak_gib']:9.2f} {r['planned_gib']:8.2f}  "
                  + " ".join(f"{x:.4f}" for x in r["losses"]))
        # saved after each part, so that a time limit (bench/gpu_session.sh's) keeps what ran
        result = dict(size=a.size, steps=a.steps, reps=a.reps, batch=batch, length=length, rows=rows)
        out.write_text(json.dumps(result, indent=2) + "\n")
        result.update(new_tokens=a.new_tokens, decoding=generation(model, a.new_tokens, a.reps + 1))
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\ngreedy decoding, {a.new_tokens} new tokens:")
        for r in result["decoding"]:
            print(f"  {r['case']:38} {r['tokens_per_second']:7.1f} tokens/s", flush=True)
        result.update(lora_steps=lora_steps(model, batch, length, a.reps + 1))
        out.write_text(json.dumps(result, indent=2) + "\n")
    print("\na step's forward and backward, LoRA on the experts added by qlora against through PEFT:")
    for r in result["lora_steps"]:
        print(f"  experts {'in 4 bits' if r['experts_in_4bit'] else 'in full  '}, checkpointing "
              f"{'on ' if r['checkpointing'] else 'off'}  {r['qlora_s']:.2f} s against {r['peft_s']:.2f} s "
              f"({r['peft_s'] / r['qlora_s']:.2f}x), LoRA gradients within {r['largest_gradient_difference']:.1e}")
    print(f"\nresults: {a.out}")


if __name__ == "__main__":
    main()
