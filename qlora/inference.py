"""Load what was trained for talking to it: a run (4-bit base + adapter), a merged folder, or a base.

The base model, its quantization and the tokenizer (with the chat template the adapter was trained
with) come from the run, so serving renders prompts exactly as training did.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from qlora.adapters import adapter_dir
from qlora.config import QLoraConfig
from qlora.errors import UserError


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    has_adapter: bool
    name: str  # what was loaded, for messages
    device: str


def run_config(adapter: Path) -> Optional[QLoraConfig]:
    """The resolved config a run was trained with (RUN/config.yaml), if the adapter sits in a run."""
    from omegaconf import OmegaConf

    from qlora.config import register

    path = adapter.parent / "config.yaml"
    if not path.is_file():
        return None
    from qlora.checkpoints import ADDED_KEYS

    register()
    saved = OmegaConf.load(path)
    for key, value in ADDED_KEYS.items():  # keys added since the run, at the value it had
        if OmegaConf.select(saved, key) is None:
            OmegaConf.update(saved, key, value)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QLoraConfig), saved))


def load_for_inference(cfg: QLoraConfig, chat: bool = True, exact: bool = False) -> Loaded:
    """The model to generate with: run adapter on its 4-bit base when `adapter` is set, else a model.
    chat=False accepts a tokenizer without a chat template (plain-text data); exact=True multiplies in
    fp32 whatever gen.bf16_base_products says (the reference that merge and export check against)."""
    from qlora.models import (compute_dtype, load_base_model, load_tokenizer, pick_device, resize_for_tokenizer,
                              resolve_model)

    model_cfg, quant = cfg.model, cfg.quant
    if cfg.adapter:
        adir = adapter_dir(cfg.adapter)
        trained = run_config(adir)
        if trained is not None:
            model_cfg, quant = trained.model, trained.quant
        name, path = adapter_base(cfg, adir, model_cfg.name_or_path if trained else None)
        model_cfg = replace(model_cfg, name_or_path=name)
        tokenizer = load_tokenizer(str(adir), model_cfg, chat)  # the tokenizer saved with the adapter
    else:
        path = resolve_model(model_cfg.name_or_path)
        tokenizer = load_tokenizer(path, model_cfg, chat)
    device = pick_device()
    model = load_base_model(path, model_cfg, quant, device, compute_dtype(quant, device))
    resize_for_tokenizer(model, tokenizer)  # a run that added tokens (model.chat_template=chatml)
    if cfg.adapter:
        from peft import PeftModel

        from qlora.experts_4bit import peft_wrapping

        try:
            with peft_wrapping(model):  # a mixture's experts
                model = PeftModel.from_pretrained(model, str(adir))
            model.peft_config["default"].base_model_name_or_path = path  # where it is now: merge reads it
        except (RuntimeError, ValueError, KeyError) as e:
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise UserError(f"adapter={cfg.adapter} does not fit the base model {model_cfg.name_or_path}: "
                            f"{detail}") from None
    model.eval()
    if device == "cpu" and quant.load_in_4bit:
        from qlora.dequant import use_for_inference
        from qlora.validation import bf16_products_on

        use_for_inference(cfg.gen.fast_dequant, bf16=not exact and bf16_products_on(cfg.gen.bf16_base_products))
    return Loaded(model, tokenizer, bool(cfg.adapter), cfg.adapter or model_cfg.name_or_path, device)


def adapter_base_folder(cfg: QLoraConfig) -> str:
    """Where the base of adapter=RUN is (adapter_base's answer), without loading anything."""
    adir = adapter_dir(cfg.adapter)
    trained = run_config(adir)
    return adapter_base(cfg, adir, trained.model.name_or_path if trained else None)[1]


def adapter_base(cfg: QLoraConfig, adir: Path, trained_on: Optional[str]) -> Tuple[str, str]:
    """The base model an adapter goes on, and where it is (resolve_model's answer): model.name_or_path where
    it is given (a base that moved; a line says so), else the one it was trained on (its run's config.yaml,
    or adapter_config.json). A base no longer there is refused with how to point at it."""
    import json

    from qlora.config import ModelConfig
    from qlora.models import resolve_model, say

    if trained_on is None:
        trained_on = json.loads((adir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    given = cfg.model.name_or_path if cfg.model.name_or_path != ModelConfig.name_or_path else None
    if given:
        if trained_on and given != trained_on:
            say(f"adapter={cfg.adapter} on model.name_or_path={given} (trained on {trained_on})")
        return given, resolve_model(given)
    if not trained_on:
        raise UserError(f"adapter={cfg.adapter}: adapter_config.json names no base model; give model.name_or_path")
    try:
        return trained_on, resolve_model(trained_on)
    except UserError as e:
        raise UserError(f"{e}. adapter={cfg.adapter} was trained on that base; if it has moved, give "
                        "model.name_or_path=WHERE_IT_IS_NOW") from None


def conversation(prompt: str, system: Optional[str] = None,
                 history: Optional[List[Dict[str, str]]] = None) -> List[Dict[str, str]]:
    """Messages for a prompt: optional system message, earlier turns, then the user turn."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + list(history or []) + [{"role": "user", "content": prompt}]
