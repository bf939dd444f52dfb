"""`qlora export`: a run (merged first) or a merged folder, written for another runtime.

- safetensors: the merged HF folder (as `qlora merge`).
- gguf: one .gguf file written in Python by gguf_writer.py (F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1
  or Q4_0), with the tokenizer, chat template and stop tokens in its metadata; the K-quants (Q6_K, Q5_K_M,
  Q4_K_M) quantized from its f16 file by llama.cpp, where llama-cpp-python is installed.
  A vision model's image part (Gemma 3) goes in a second file, llama.cpp's mmproj (gguf_vision.py).
- ollama: the GGUF file plus a Modelfile whose TEMPLATE, SYSTEM and stop parameters come from the
  chat template.
- nf4: the fp32 merged weights re-quantized to NF4 (double quant) and saved through bitsandbytes'
  serialization, for small deployments; its agreement with the adapter is checked too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

from qlora.config import ExportFormat, QLoraConfig, SaveDtype
from qlora.errors import UserError, WorkError
from qlora.gguf_families import check_gguf_arch
from qlora.gguf_writer import write_gguf
from qlora.merge import merge_run, output_folder
from qlora.outputs import claim_output_dir
from qlora.validation import refuse, validate_merge


def export_cli(cfg: QLoraConfig) -> int:
    """The `qlora export` verb."""
    from qlora.models import say

    fmt = cfg.export.format
    if cfg.adapter:
        out = output_folder(cfg, "export")
    else:
        out = plain_output(cfg)
    if fmt is ExportFormat.safetensors:
        if not cfg.adapter:
            raise UserError("export.format=safetensors writes a run's merged model: give adapter=RUN")
        merge_run(cfg, out)
        print(out)
        return 0
    if cfg.adapter and fmt is not ExportFormat.nf4:  # before the merge, which takes minutes on large models
        from qlora.inference import adapter_base_folder

        check_gguf_arch(adapter_base_folder(cfg))
    if fmt is ExportFormat.ollama:  # the tokenizer the merged folder will hold: the run's, or the folder's
        from transformers import AutoTokenizer

        from qlora.adapters import adapter_dir

        ollama_template(AutoTokenizer.from_pretrained(adapter_dir(cfg.adapter) if cfg.adapter
                                                      else Path(cfg.model.name_or_path).expanduser()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        staged = tmp / "out"
        staged.mkdir()
        if cfg.adapter:  # merge in fp32 first: every format below starts from the merged weights
            merged = tmp / "merged"
            merge_run(replace(cfg, merge=replace(cfg.merge, dtype=SaveDtype.float32)), merged)
            shutil.copy(merged / "merge_report.json", staged / "merge_report.json")
        else:
            from qlora.prequantized import loadable_in_4bit

            # a folder stored in MXFP4 (gpt-oss as OpenAI ships it) as its bf16 conversion
            merged = Path(loadable_in_4bit(str(Path(cfg.model.name_or_path).expanduser()), cfg.model.name_or_path))
        if fmt is ExportFormat.nf4:
            export_nf4(cfg, merged, staged)
        else:
            gguf = staged / f"model-{cfg.export.gguf_type.value}.gguf"
            write_gguf(merged, gguf, cfg.export.gguf_type, model_name(cfg))
            if fmt is ExportFormat.ollama:
                write_modelfile(merged, gguf.name, staged / "Modelfile")
            export_vision_tower(cfg, merged, staged)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"exported {fmt.value} to {out}")
    print(out)
    return 0


def export_vision_tower(cfg: QLoraConfig, merged: Path, staged: Path) -> None:
    """A vision model's image part (Gemma 3 from 4B up): beside a GGUF, llama.cpp's mmproj file; an Ollama
    export holds the language model alone."""
    from transformers import AutoConfig

    from qlora.gguf_vision import has_vision_tower, mmproj_type, write_mmproj
    from qlora.models import say

    if not has_vision_tower(AutoConfig.from_pretrained(merged)):
        return
    if cfg.export.format is ExportFormat.ollama:
        say("export.format=ollama: the Modelfile's model reads text only (Ollama's Gemma 3 has been reported to "
            "lose its vision with llama.cpp's mmproj files, ollama/ollama#9967); export.format=gguf writes one "
            "beside the model for llama.cpp")
        return
    kind = mmproj_type(cfg.export.gguf_type)
    path = staged / f"mmproj-{kind.value}.gguf"
    write_mmproj(merged, path, kind, model_name(cfg))
    say(f"export: the vision tower and its projector in {path.name}, in {kind.value} (llama.cpp: "
        f"llama-mtmd-cli -m model-{cfg.export.gguf_type.value}.gguf --mmproj {path.name} --image PICTURE)")


def model_name(cfg: QLoraConfig) -> str:
    """The name a GGUF file gives the model: the run's folder name (the merge's folder is a temporary one),
    or the model folder's."""
    if cfg.adapter:
        from qlora.adapters import adapter_dir

        folder = adapter_dir(cfg.adapter).resolve()
        return (folder.parent if folder.name == "adapter" else folder).name
    return Path(cfg.model.name_or_path).expanduser().resolve().name


def plain_output(cfg: QLoraConfig) -> Path:
    """Without adapter=, export takes a merged (or any HF) folder from model.name_or_path."""
    refuse(validate_merge(cfg))
    src = Path(cfg.model.name_or_path).expanduser()
    if not (src / "config.json").is_file():
        raise UserError("give adapter=RUN, or model.name_or_path=MERGED_FOLDER (an HF model folder)")
    return claim_output_dir(cfg)


# ------------------------------------------------------------------------------------------- Ollama

# Go templates for the chat formats Ollama users meet most, chosen in this order by the markers of the Jinja
# template. Ollama gives the system messages joined as .System and (since 0.4) in .Messages too: the range
# leaves them out, or they would be written twice.
OLLAMA_TEMPLATES = {
    "<|im_start|>": ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                     "{{- range .Messages }}{{ if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}"
                     "<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n", ["<|im_end|>", "<|im_start|>"]),
    "<|start_header_id|>": ("<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n"
                            "{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}{{ if ne .Role \"system\" }}"
                            "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
                            "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n", ["<|eot_id|>"]),
    # Gemma: no system turn; the system message opens the first user turn, as Gemma's Jinja template writes it
    "<start_of_turn>": ("<bos>{{- $system := .System }}{{- range .Messages }}{{ if eq .Role \"user\" }}"
                        "<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}"
                        "{{ .Content }}<end_of_turn>\n{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n"
                        "{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n", ["<end_of_turn>"]),
    # Llama 2: the system message inside the first user turn; before Mistral, whose markers it shares
    "<<SYS>>": ("{{- $system := .System }}{{- range .Messages }}{{ if eq .Role \"user\" }}<s>[INST] "
                "{{ if $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ $system = \"\" }}{{ end }}"
                "{{ .Content }} [/INST]{{ else if eq .Role \"assistant\" }} {{ .Content }} </s>{{ end }}{{ end }}",
                ["</s>", "[INST]"]),
    # Mistral (v0.3): the system message with the last user turn, as its Jinja template writes it
    "[INST]": ("<s>{{- range $i, $_ := .Messages }}{{ if eq .Role \"user\" }}[INST] "
               "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}"
               "[/INST]{{ else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}{{ end }}", ["</s>", "[INST]"]),
    # Phi-3 before Zephyr: the same role markers, turns ended by <|end|>
    "<|end|>": ("{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{- range .Messages }}"
                "{{ if ne .Role \"system\" }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}"
                "<|assistant|>\n", ["<|end|>", "<|user|>"]),
    "<|assistant|>": ("{{- if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}{{- range .Messages }}"
                      "{{ if ne .Role \"system\" }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}{{ end }}"
                      "<|assistant|>\n", ["</s>", "<|user|>"]),
}


# gpt-oss's chat format (harmony): turns in channels, which none of the templates above writes
HARMONY = "<|channel|>"


def default_system(tokenizer) -> Optional[str]:
    """The system message a template inserts when the conversation has none (SmolLM2's does)."""
    from jinja2.exceptions import TemplateError

    user = [{"role": "user", "content": "QLORA_PROBE_USER"}]
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    try:
        probed = tokenizer.apply_chat_template([{"role": "system", "content": "QLORA_PROBE_SYSTEM"}] + user,
                                               tokenize=False)
    except TemplateError:  # a template without a system role (Gemma 2's) raises
        return None
    before, _, after = probed.partition("QLORA_PROBE_SYSTEM")
    # without a system message the template rendered `before + DEFAULT + after`
    if after and plain.startswith(before) and plain.endswith(after) and len(plain) > len(before) + len(after):
        return plain[len(before):len(plain) - len(after)]
    return None


def ollama_template(tokenizer):
    """(the Go template, its stop strings) for the tokenizer's chat template, by its markers; refused where
    none is known (gpt-oss's harmony format shares Phi-3's <|end|> but not its turns)."""
    template = tokenizer.chat_template or ""
    match = None if HARMONY in template else next((m for m in OLLAMA_TEMPLATES if m in template), None)
    if match is None:
        raise UserError("export.format=ollama knows ChatML, Llama-3, Llama-2, Mistral, Gemma, Phi-3 and Zephyr chat "
                        "templates; this model's template is none of them: use export.format=gguf and write the "
                        "Modelfile TEMPLATE by hand")
    return OLLAMA_TEMPLATES[match]


def write_modelfile(folder: Path, gguf_name: str, path: Path) -> None:
    from transformers import AutoTokenizer

    from qlora.models import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(folder)
    go_template, stops = ollama_template(tokenizer)
    stops = sorted(set(stops) | {tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)})
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template}"""']
    system = default_system(tokenizer)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- NF4

def export_nf4(cfg: QLoraConfig, merged: Path, out: Path) -> None:
    """Re-quantize the fp32 merged weights to NF4 and save them with bitsandbytes' serialization."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora.models import pick_device

    device = pick_device()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(merged, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": 0 if device == "cuda" else "cpu"})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(merged).save_pretrained(out)
    for name in ("generation_config.json",):
        if (merged / name).is_file():
            shutil.copy(merged / name, out / name)
    if cfg.adapter:
        from qlora.inference import load_for_inference
        from qlora.merge import check_texts, compare_logits

        loaded = load_for_inference(cfg, exact=True)
        reloaded = AutoModelForCausalLM.from_pretrained(out, device_map={"": 0 if device == "cuda" else "cpu"})
        result = compare_logits(loaded.model, reloaded, loaded.tokenizer,
                                check_texts(cfg, loaded.tokenizer, cfg.merge.check_prompts),
                                max_tokens=cfg.merge.check_max_tokens)
        result["saved_dtype"] = "nf4"
        (out / "nf4_report.json").write_text(json.dumps(result, indent=2) + "\n")
        if result["top1_agreement"] < cfg.merge.min_top1_agreement_nf4:
            raise WorkError(f"the NF4 export agrees with the adapter model on {result['top1_agreement']:.2%} of "
                            f"tokens, below merge.min_top1_agreement_nf4={cfg.merge.min_top1_agreement_nf4}")
