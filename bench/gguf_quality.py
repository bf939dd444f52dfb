"""GGUF types by quality and size, run in llama.cpp: `qlora export export.format=gguf` of a model at each type,
its next-token distributions in llama.cpp (llama-cpp-python) against the model's own in transformers (fp32).

usage: python bench/gguf_quality.py [--model smollm2-135m-instruct] [--types q8_0,q6_k,...]
                                    [--out bench/results/gguf_quality.json]

The texts are four of the demo's held-out conversations as the chat template writes them and two plain
prompts; every position counts. top-1: the share of positions where both pick the same next token; KL: the
mean KL(model || GGUF) of those next-token distributions. Needs llama-cpp-python (`pip install
'qlora[llama-cpp]'`). The table is printed; the JSON and a plot (size against divergence) written.
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from plots import gguf_quality_plot

PROMPTS = ["What is the capital of France? Tell me about its history in a few sentences.",
           "Write a haiku about autumn leaves."]
TYPES = "f16,q8_0,q6_k,q5_k_m,q5_0,q4_k_m,q4_0"


def next_token_logits(model_dir: Path, gguf_file: Path, texts: list) -> tuple:
    """(transformers' fp32 logits, llama.cpp's) at every position of the texts, stacked."""
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=512, logits_all=True, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ours, theirs = [], []
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            ours.append(model(torch.tensor([ids])).logits[0].numpy())
        llm.reset()
        llm.eval(ids)
        theirs.append(np.array(llm.scores[:len(ids)]))
    return np.concatenate(ours), np.concatenate(theirs)


def main():
    from transformers import AutoTokenizer

    from qlora.cli import main as qlora
    from qlora.config import DEMO_DIR
    from qlora.models import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--out", default="bench/results/gguf_quality.json")
    a = ap.parse_args()
    model = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in (DEMO_DIR / "people_eval.jsonl").read_text().splitlines()[:4]]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows] + PROMPTS
    results = []
    print("| type | file MB | top-1 | KL |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.types.split(","):
            out = Path(tmp) / kind
            assert qlora(["export", f"model.name_or_path={model}", "export.format=gguf",
                          f"export.gguf_type={kind}", f"output_dir={out}"]) == 0
            path = out / f"model-{kind}.gguf"
            want, got = next_token_logits(model, path, texts)
            log_p = torch.log_softmax(torch.from_numpy(want).double(), -1)
            log_q = torch.log_softmax(torch.from_numpy(got).double(), -1)
            row = dict(type=kind, file_mb=round(path.stat().st_size / 1e6, 1), positions=len(want),
                       top1=float((want.argmax(-1) == got.argmax(-1)).mean()),
                       kl=float((log_p.exp() * (log_p - log_q)).sum(-1).mean()))
            results.append(row)
            print(f"| {kind} | {row['file_mb']:.0f} | {100 * row['top1']:.1f}% | {row['kl']:.4f} |", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    result = dict(model=a.model, texts=len(texts), rows=results)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    gguf_quality_plot(result, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
