"""qlora against the plain stack on one GPU: the shapes and cases of shared/bench/plain_stack_gpu.py,
each side in its own process, in one run.

usage: python bench/gpu_speed.py --plain PATH/TO/plain_stack_gpu.py [--only tl-bf16-ckpt,l8b-bf16-ckpt,tl-bf16-var]
                                 [--plain-cases CASE,...] [--set train.optim=adamw_torch_fused ...]
                                 [--out bench/results/gpu_speed.json]
       python bench/gpu_speed.py --tiny      # qlora's side only, on a tiny shape: checks the pipeline on CPU

The plain side is the shared script's own case (its numbers are measured after 4 warm-up steps).
qlora's side trains the same random-init model (the shared script's make_model) on the same random
token ids, written as `text` rows, with the same LoRA (r=16, alpha 32, all-linear), batch, length,
compute dtype and constant learning rate, and qlora's defaults otherwise. Its tokens/s is
measured as the shared script's: non-padding tokens from the end of step 4 to the last step
(metrics.jsonl); peak memory is over the whole run (the shared script resets it at step 4).
Varied lengths: the plain side's padded and TRL-packed cases against qlora's `data.packing=true`.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from plots import gpu_plot

WARM, MEAS = 4, 12
# ours: (plain cases to compare with, shape, seq, batch, packing)
CASES = {
    "tl-bf16-ckpt": (["tl-bf16-ckpt", "tl-bf16-ckpt-liger"], "tinyllama-1.1b", 2048, 8, False),
    "l8b-bf16-ckpt": (["l8b-bf16-ckpt", "l8b-bf16-ckpt-liger"], "llama3-8b", 2048, 4, False),
    "tl-bf16-var": (["tl-bf16-var-padded", "tl-bf16-var-packed"], "tinyllama-1.1b", 2048, 8, True),
}


def load_plain(path: str):
    spec = importlib.util.spec_from_file_location("plain_stack_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def token_rows(vocab: int, n_rows: int, length: int, varied: bool):
    """The shared script's data: random ids (seed 1), fixed length or lognormal lengths (median ~200)."""
    import torch

    g = torch.Generator().manual_seed(1)
    if varied:
        lens = torch.exp(torch.randn(n_rows * 12, generator=g) * 0.8 + 5.3).clamp(16, 1024).long()
        return [torch.randint(10, vocab, (int(n),), generator=g).tolist() for n in lens]
    return torch.randint(10, vocab, (n_rows, length), generator=g).tolist()


def word_model(model_path: str, vocab: int, folder: Path) -> str:
    """The same weights with a word-level tokenizer whose special tokens are not substrings of the
    words (the shared script's t0-t3 specials would split "t123" into "t1" + "23"), so that the
    text rows tokenize back to exactly the shared script's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = folder / "model"
    out.mkdir()
    for f in Path(model_path).iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).symlink_to(f.resolve())
    words = {f"t{i}": i for i in range(4, vocab)} | {"<unk>": 0, "<pad>": 1, "<eos>": 2, "<bos>": 3}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                            bos_token="<bos>").save_pretrained(out)
    return str(out)


def ours(model_path: str, vocab: int, seq: int, batch: int, packing: bool, folder: Path, device_note: str,
         extra: list) -> dict:
    from qlora.cli import compose
    from qlora.train import fit

    model_path = word_model(model_path, vocab, folder)
    rows = token_rows(vocab, batch * (WARM + MEAS), seq, packing)
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in r)}) + "\n" for r in rows))
    cfg = compose("train", [
        f"model.name_or_path={model_path}", f"data.path={data}", "data.format=text", "data.eval_path=null",
        f"data.packing={str(packing).lower()}", "eval.exact_match=false", "lora.r=16", "lora.lora_alpha=32",
        f"train.per_device_train_batch_size={batch}", f"train.max_length={seq}", f"train.max_steps={WARM + MEAS}",
        "train.learning_rate=2e-4", "train.lr_scheduler_type=constant", "train.warmup_ratio=0",
        "train.logging_steps=1", "train.save_steps=100000", "train.report_to=[none]", f"output_dir={folder / 'run'}",
        *extra])
    run = fit(cfg)
    r = run.report
    # as the shared script measures: tokens and seconds from the end of step WARM to the last step
    logs = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = {x["step"]: x for x in logs if "tokens" in x and "seconds" in x}
    last = max(logs)
    tok_s = (logs[last]["tokens"] - logs[WARM]["tokens"]) / (logs[last]["seconds"] - logs[WARM]["seconds"])
    return dict(side="qlora", tok_s=round(tok_s), tok_s_whole_loop=r["tokens_per_second"],
                peak_gib=r["peak_memory_gb"], steps=r["steps"], loss_first=r["loss_first"],
                loss_last=r["loss_last"], device=r["device"] or device_note, overrides=extra,
                padding_free_attention=r["padding_free_attention"])


def tiny_model(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2",
                            bos_token="t3").save_pretrained(folder)
    return folder


def ours_case(case: str, plain_path: str, tiny: bool, folder: Path, extra: list) -> dict:
    """qlora's side of a case: on the shared script's model of its shape, or (tiny) on a tiny model,
    packed for the case "var"."""
    if tiny:
        return ours(str(tiny_model(folder / "m")), 1000, 64, 2, case == "var", folder, "cpu", extra)
    plain = load_plain(plain_path)
    _, shape, seq, batch, packing = CASES[case]
    return ours(plain.make_model(shape), plain.SHAPES[shape]["vocab_size"], seq, batch, packing, folder, "cpu", extra)


def child(a) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("RESULT " + json.dumps(ours_case(a.case, a.plain, a.tiny, Path(tmp), a.set)), flush=True)


def run(cmd, tag: str = "RESULT ") -> dict:
    """The JSON a child process printed last after `tag`, or its last line of errors."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(tag)]
    if not lines:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1][len(tag):])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", help="path to shared/bench/plain_stack_gpu.py")
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--plain-cases", default="", help="run only these of the shared script's cases")
    ap.add_argument("--out", default="bench/results/gpu_speed.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for qlora's side (repeatable), to measure one lever")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--case")
    a = ap.parse_args()
    if a.child:
        return child(a)
    me = [sys.executable, __file__, "--child", *(f"--set={x}" for x in a.set)]
    if a.tiny:
        for case in ("fixed", "var"):
            print(case, run(me + ["--tiny", "--case", case]), flush=True)
        return
    if not a.plain:
        raise SystemExit("give --plain PATH/TO/plain_stack_gpu.py (shared/bench), or --tiny")
    rows = []
    for case in a.only.split(","):
        plains, *_ = CASES[case]
        for p in [p for p in plains if not a.plain_cases or p in a.plain_cases.split(",")]:
            rows.append({**run([sys.executable, a.plain, "--case", p]), "case": case, "side": p})
            print(rows[-1], flush=True)
        rows.append({**run(me + ["--plain", a.plain, "--case", case]), "case": case, "side": "qlora"})
        print(rows[-1], flush=True)
    print(f"\n{'case':14} {'side':22} {'tokens/s':>9} {'peak GiB':>9} {'vs first plain':>15}")
    for case in a.only.split(","):
        mine = [r for r in rows if r["case"] == case]
        base = next((r for r in mine if "tok_s" in r), None)
        for r in mine:
            if "tok_s" not in r:
                print(f"{case:14} {r.get('side', '?'):22} ERROR {r.get('error')}")
                continue
            ratio = r["tok_s"] / base["tok_s"] if base else float("nan")
            print(f"{case:14} {r['side']:22} {r['tok_s']:>9} {r['peak_gib']:>9} {ratio:>15.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")
    try:
        gpu_plot(rows, Path(a.out).with_suffix(".png"))
    except ImportError as e:  # a GPU machine without matplotlib: the JSON is what counts
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
