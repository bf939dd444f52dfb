"""Peak memory and time of `qlora export export.format=gguf` on a random Llama of a chosen size, for several
GGUF types, against the same interpreter importing what export imports and nothing more; each case in its
own process. The model's own size in fp32 is printed beside them: the writer keeps one tensor at a time (and
gguf's 256 MB spool), not the model.

usage: python bench/export_memory.py [--hidden 1024 --layers 8 --vocab 32000] [--out bench/results/export_memory.json]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from merge_memory import measured

MAKE_MODEL = """
import sys, torch
sys.path.insert(0, sys.argv[5])
from transformers import LlamaConfig, LlamaForCausalLM
from tests.conftest import make_tokenizer
hidden, layers, vocab = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
make_tokenizer().save_pretrained(sys.argv[1])
print(sum(p.numel() for p in model.parameters()))
"""
IMPORTS_ONLY = "import torch, transformers, gguf, qlora.cli, qlora.gguf_writer, qlora.export"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--out", default="bench/results/export_memory.json")
    a = ap.parse_args()
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        made = subprocess.run([sys.executable, "-c", MAKE_MODEL, str(base), str(a.hidden), str(a.layers),
                               str(a.vocab), root], capture_output=True, text=True, check=True)
        params = int(made.stdout.strip().splitlines()[-1])
        wall, peak = measured([sys.executable, "-c", IMPORTS_ONLY])
        rows = [dict(case="imports only", seconds=round(wall, 1), peak_rss_gib=round(peak, 3))]
        for kind in a.types.split(","):
            out = Path(tmp) / kind
            wall, peak = measured([sys.executable, "-m", "qlora", "export", f"model.name_or_path={base}",
                                   "export.format=gguf", f"export.gguf_type={kind}", f"output_dir={out}"])
            size = (out / f"model-{kind}.gguf").stat().st_size / 2**30
            rows.append(dict(case=f"export {kind}", seconds=round(wall, 1), peak_rss_gib=round(peak, 3),
                             file_gib=round(size, 3)))
    result = dict(params=params, fp32_gib=round(params * 4 / 2**30, 3), rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"random Llama, {params / 1e6:.0f}M parameters ({result['fp32_gib']} GiB in fp32)")
    print("case          | seconds | peak RSS GiB | file GiB")
    for r in rows:
        print(f"{r['case']:<13} | {r['seconds']:>7} | {r['peak_rss_gib']:>12} | {r.get('file_gib', '')}")
    print(f"({a.out})")


if __name__ == "__main__":
    main()
