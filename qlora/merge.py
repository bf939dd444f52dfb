"""`qlora merge`: fold a run's LoRA adapter into its base and write a standalone 16-bit model.

An adapter trained with QLoRA learned against the NF4-dequantized weights, so by default it is added
to exactly those (merge.into=dequantized); adding it to the original weights gives a different model.
The arithmetic is fp32; only the result is cast to merge.dtype. PEFT's merge on 4-bit layers is never
used (it re-quantizes). The base is streamed shard by shard: peak memory is the 4-bit model plus
one shard, not the whole model in 16 bits.

After writing, a self-check compares the merged model with the adapter model on fixed prompts
(top-1 agreement, logit differences, KL) and fails below merge.min_top1_agreement.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

from qlora.config import MergeInto, QLoraConfig
from qlora.validation import refuse, validate_merge
from qlora.errors import UserError, WorkError
from qlora.merge_experts import from_model, fused_layout, fused_merged, parameter_of, unwrapped
from qlora.outputs import claim_output_dir

# the image processor's settings, which a vision model's merged folder keeps from its base
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
CHECK_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence what a neural network is.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to cook.",
    "Who wrote Romeo and Juliet?",
]


def merge_cli(cfg: QLoraConfig) -> int:
    """The `qlora merge` verb."""
    out = output_folder(cfg, "merge")
    merged = merge_run(cfg, out)
    print(merged)
    return 0


def output_folder(cfg: QLoraConfig, what: str) -> Path:
    """The output folder of merge/export: refused when it exists and is not empty (unless overwrite)."""
    refuse(validate_merge(cfg))
    if not cfg.adapter:
        raise UserError(f"give the run to {what}: adapter=RUN_DIR (or its adapter/ folder)")
    return claim_output_dir(cfg)


def checkpoint_names(model) -> Callable[[str], str]:
    """The model's own name for each key of its safetensors files. transformers renames some checkpoints'
    keys as it loads them, by the model's conversion mapping (multimodal models: the files' language_model.
    model.layers.0... is the model's model.language_model.layers.0...); the same renamings are applied here.
    Keys that transformers fuses or splits on load (converted, not only renamed) keep their own name."""
    identity = lambda key: key  # noqa: E731
    try:
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # another transformers: the names as they are, and check_all_found says what is missing
        return identity
    renamings = [m for m in getattr(model, "_weight_conversions", None) or [] if isinstance(m, WeightRenaming)]
    if not renamings:
        return identity
    known = {f"{name}.weight": True for name, _ in model.named_modules()}
    known.update((name, True) for name, _ in model.named_parameters())

    def rename(key: str) -> str:
        renamed, _ = rename_source_key(key, renamings, [], model.base_model_prefix, known)
        return renamed if renamed in known else key
    return rename


def check_all_found(files: List[Path], modules: Dict[str, object], rename: Callable[[str], str],
                    fused: Dict[str, List[str]]) -> None:
    """Refuses a merge in which a LoRA layer's base weight is in none of the files under the layer's name
    (its LoRA would be left out of the merged model); a fused parameter's (see fused_layout) must be in the
    files under every name it is saved by."""
    from safetensors import safe_open

    keys = set()
    for f in files:
        with safe_open(str(f), framework="pt") as shard:
            keys.update(shard.keys())
    found = {rename(key).rpartition(".")[0] for key in keys if key.endswith(".weight")}
    missing = [name for name, m in modules.items() if "default" in getattr(m, "lora_A", {})
               and unwrapped(name) not in found and parameter_of(name, m) not in fused]
    missing += [parameter for parameter, saved in fused.items() if not set(saved) <= keys]
    if missing:
        raise WorkError(f"the base's safetensors files hold no weight named for {len(missing)} LoRA layer(s), e.g. "
                        f"{missing[0]} (transformers converts this model's weights as it loads them, or the weight "
                        "is tied to another); merge cannot fold their LoRA in: serve the run with adapter=RUN")


def merge_run(cfg: QLoraConfig, out: Path) -> Path:
    """Write the merged model to `out` (aside, then renamed) and its merge_report.json."""
    import torch
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from qlora.inference import load_for_inference
    from qlora.models import say, weight_files

    started = time.perf_counter()
    loaded = load_for_inference(cfg, exact=True)
    peft_model, tokenizer = loaded.model, loaded.tokenizer
    check_compatible(peft_model)
    base_path = peft_model.peft_config["default"].base_model_name_or_path
    modules = dict(peft_model.get_base_model().named_modules())
    dtype = getattr(torch, cfg.merge.dtype.value)

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = weight_files(base_path)
    rename = checkpoint_names(peft_model.get_base_model())
    dequantized = cfg.merge.into is MergeInto.dequantized
    sources = from_model(modules, dequantized)
    fused = fused_layout(peft_model.get_base_model(), sources)
    check_all_found(files, modules, rename, fused)
    say(f"merging {cfg.adapter} into the {cfg.merge.into.value} base, {len(files)} shard(s) -> "
        f"{cfg.merge.dtype.value}")
    owner = {key: parameter for parameter, saved in fused.items() for key in saved}
    split: Dict[str, Dict[str, object]] = {}  # a tensor's parts from the model not yet written
    writer = ShardWriter(tmp, parse_size(cfg.merge.max_shard_size))
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as shard:
            total += len(shard.keys())
    bar = tqdm(total=total, desc="merging", unit="tensor")
    for f in files:
        with safe_open(str(f), framework="pt") as shard:
            for key in shard.keys():
                bar.update()
                if key in owner:
                    parts = split.pop(owner[key], None) or fused_merged(
                        peft_model.get_base_model(), sources[owner[key]], owner[key], dequantized)
                    tensor = parts.pop(key)
                    if tuple(tensor.shape) != tuple(shard.get_slice(key).get_shape()):
                        raise UserError(f"adapter does not fit the base at {owner[key]}: merged {key} has shape "
                                        f"{tuple(tensor.shape)}, the file's {tuple(shard.get_slice(key).get_shape())}")
                    if parts:
                        split[owner[key]] = parts
                    if not dequantized:
                        tensor = shard.get_tensor(key).float() + tensor
                else:
                    tensor = merged_tensor(rename(key), shard.get_tensor(key), modules, cfg.merge.into)
                writer.add(key, tensor.to(dtype).contiguous())
    bar.close()
    writer.close()
    write_model_files(peft_model, tokenizer, tmp, dtype)
    for name in PROCESSOR_FILES:  # a vision model's image processor: the merged folder reads images as the base
        if (files[0].parent / name).is_file():
            shutil.copy(files[0].parent / name, tmp / name)
    del modules, sources, peft_model
    report = self_check(cfg, loaded, tmp, dtype)
    report.update(into=cfg.merge.into.value, dtype=cfg.merge.dtype.value, adapter=str(cfg.adapter),
                  base=str(base_path), seconds=round(time.perf_counter() - started, 2))
    (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    say(f"top-1 agreement {report['top1_agreement']:.2%}, max logit diff {report['max_logit_diff']:.2e}, "
        f"KL {report['kl']:.2e} over {report['tokens']} tokens")
    if report["top1_agreement"] < cfg.merge.min_top1_agreement:
        raise WorkError(f"merged model agrees with the adapter model on {report['top1_agreement']:.2%} of "
                        f"tokens, below merge.min_top1_agreement={cfg.merge.min_top1_agreement} "
                        f"(see {out / 'merge_report.json'})")
    return out


def check_compatible(peft_model) -> None:
    cfg = peft_model.peft_config["default"]
    if getattr(cfg, "use_dora", False):
        raise UserError("merging DoRA adapters is not available yet; serve the run with adapter=RUN")
    if getattr(cfg, "bias", "none") != "none":
        raise UserError(f"merging adapters with trained biases (lora.bias={cfg.bias}) is not available yet")


def merged_tensor(key: str, tensor, modules: Dict[str, object], into: MergeInto):
    """A base tensor (key: the model's name for it) with the adapter folded in, in fp32."""
    import bitsandbytes.functional as bnbf
    import torch

    name, _, leaf = key.rpartition(".")
    module = modules.get(name)
    if module is None or leaf != "weight":
        return tensor.float()
    if hasattr(module, "modules_to_save"):  # trained in full (e.g. resized embeddings)
        return module.modules_to_save["default"].weight.detach().float().cpu()
    base = getattr(module, "base_layer", module)
    weight = tensor.float()
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is not None and into is MergeInto.dequantized:
        # exactly the weights training saw: the model's own NF4 codes, dequantized in fp32
        weight = bnbf.dequantize_4bit(base.weight.data, quant_state).to(torch.float32).cpu()
        weight = weight.reshape(tensor.shape)
    if hasattr(module, "lora_A") and "default" in module.lora_A:
        a = module.lora_A["default"].weight.detach().float().cpu()
        b = module.lora_B["default"].weight.detach().float().cpu()
        if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
            raise UserError(f"adapter does not fit the base at {name}: LoRA {tuple(b.shape[:1]) + tuple(a.shape[1:])}"
                            f" vs base weight {tuple(weight.shape)}; was it trained on another model?")
        weight = weight + (b @ a) * module.scaling["default"]
    return weight


class ShardWriter:
    """Writes tensors into safetensors shards of at most max_bytes, one shard in memory at a time."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: Dict[str, object] = {}
        self.size, self.files, self.index = 0, [], {}

    def add(self, key: str, tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self.current and self.size + n > self.max_bytes:
            self.flush()
        self.current[key] = tensor
        self.size += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.current, str(self.folder / name), metadata={"format": "pt"})
        self.files.append(name)
        self.index.update({k: name for k in self.current})
        self.current, self.size = {}, 0

    def close(self) -> None:
        """The shards under transformers' names: model.safetensors, or several and the index that names them."""
        if self.current:
            self.flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0], self.folder / "model.safetensors")
            return
        total = len(self.files)
        renames = {f: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in renames.items():
            os.replace(self.folder / old, self.folder / new)
        size = sum((self.folder / f).stat().st_size for f in renames.values())
        index = {k: renames[v] for k, v in self.index.items()}
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": size}, "weight_map": index}, indent=2) + "\n")


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except ValueError:
                break
    raise UserError(f"merge.max_shard_size={text}: write a size like 500MB or 2GB")


def write_model_files(peft_model, tokenizer, folder: Path, dtype) -> None:
    """config.json (no quantization), generation_config.json (with every stop token), the tokenizer."""
    from qlora.models import stop_token_ids

    base = peft_model.get_base_model()
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = str(dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = base.generation_config.to_dict()
    gen.pop("transformers_version", None)
    gen["eos_token_id"] = stop_token_ids(tokenizer, base.generation_config)
    gen["pad_token_id"] = tokenizer.pad_token_id
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save_pretrained(folder)


def check_texts(cfg: QLoraConfig, tokenizer, n: int) -> List[str]:
    """Full conversations (prompt and answer) from the run's held-out data (its eval_path or its
    eval_fraction share), else from its training data, else built-in prompts."""
    from qlora.adapters import adapter_dir
    from qlora.data import render_chat, split_examples
    from qlora.inference import run_config

    trained = run_config(adapter_dir(cfg.adapter))
    convs = []
    if trained is not None:
        try:
            train, held, _ = split_examples(trained.data, trained.train.seed)
            convs = [ex.messages for ex in (held or train) if ex.messages][:n]
        except (UserError, OSError):
            convs = []
    if not convs:
        convs = [[{"role": "user", "content": p}] for p in CHECK_PROMPTS[:n]]
    return [render_chat(tokenizer, c, add_generation_prompt=c[-1]["role"] == "user") for c in convs]


def logits_of(model, tokenizer, texts: List[str], batch: int = 8, max_tokens: Optional[int] = None) -> Iterator:
    """fp32 logits of each text's first `max_tokens` tokens (all where None), on the CPU, one text at a time.
    The texts go through the model `batch` at a time, padded on the right (where a causal model's earlier
    positions never look), so that a model read from the disk layer by layer (see self_check) is read twice
    for 16 prompts, not 16 times; only one batch's logits are held at once."""
    import torch

    # a model whose first layers accelerate offloaded sits on "meta": its hooks move the inputs themselves
    device = model.device if model.device.type != "meta" else "cpu"
    for i in range(0, len(texts), batch):
        ids = [tokenizer(t, add_special_tokens=False).input_ids[:max_tokens] for t in texts[i:i + batch]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        rows = [row[:len(x)].float().cpu() for row, x in zip(logits, ids)]
        del logits
        yield from rows


def compare_logits(reference, candidate, tokenizer, texts: List[str],
                   max_tokens: Optional[int] = None) -> Dict[str, float]:
    """Top-1 agreement, max/mean |logit difference| and KL(reference || candidate), in fp32."""
    return compare(logits_of(reference, tokenizer, texts, max_tokens=max_tokens),
                   logits_of(candidate, tokenizer, texts, max_tokens=max_tokens))


def compare(ref: Iterable, cand: Iterable) -> Dict[str, float]:
    import torch

    agree = total = 0
    max_diff, sum_diff, kl_sum = 0.0, 0.0, 0.0
    for a, b in zip(ref, cand):
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        diff = (a - b).abs()
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.mean(-1).sum())
        # each token's KL is >= 0; float rounding makes nearly equal ones slightly negative
        kl_sum += float(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                                   reduction="none").sum(-1).clamp_min(0).sum())
    return dict(top1_agreement=agree / total, max_logit_diff=max_diff, mean_logit_diff=sum_diff / total,
                kl=kl_sum / total, tokens=total)


# The self-check's memory for the merged model in fp32, by device (accelerate's max_memory); None: accelerate's
# own budget, most of each GPU's free memory, then CPU RAM, then the disk
CHECK_MAX_MEMORY = None


def self_check(cfg: QLoraConfig, loaded, folder: Path, dtype) -> Dict[str, object]:
    """Compare the saved model (its weights computed in fp32) with the adapter on its 4-bit base.

    The adapter model's logits are taken first (each text's first merge.check_max_tokens tokens), written
    to the disk and the model freed, so the two never sit in memory together. An 8B model is 32 GB in fp32,
    more than a 24 GB GPU or Colab's RAM: what does not fit on the GPU waits in CPU RAM, and what does not
    fit there is read from the merged files, layer by layer (accelerate's offloading), so the check is
    slower there but does not run out of memory."""
    import gc
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    texts = check_texts(cfg, loaded.tokenizer, cfg.merge.check_prompts)
    # the adapter model's logits wait on the disk, one file a text: 16 texts of 256 tokens are 2 GB of fp32
    # logits over a 128k vocabulary, which would otherwise take RAM from the merged model below
    with tempfile.TemporaryDirectory(prefix=".check-", dir=folder.parent) as scratch:
        files, cut = [], cfg.merge.check_max_tokens
        for i, row in enumerate(logits_of(loaded.model, loaded.tokenizer, texts, max_tokens=cut)):
            files.append(Path(scratch) / f"reference-{i}.pt")
            torch.save(row, files[-1])
        loaded.model = None
        gc.collect()
        if loaded.device == "cuda":
            torch.cuda.empty_cache()
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="auto",
                                                      max_memory=CHECK_MAX_MEMORY,
                                                      offload_folder=str(Path(scratch) / "offload"))
        result = compare((torch.load(f) for f in files),
                         logits_of(merged, loaded.tokenizer, texts, max_tokens=cut))
        del merged
    result.update(prompts=len(texts), measured_in="float32", saved_dtype=str(dtype).replace("torch.", ""))
    return result
