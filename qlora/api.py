"""The Python API for notebooks: load a run or a model once, then ask it questions.

    from qlora.api import load
    bot = load(adapter="outputs/smollm2_demo/RUN")
    bot.ask("What is the capital of France?")
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional

from qlora.config import GenConfig
from qlora.generate import generate_answers
from qlora.inference import Loaded, conversation, load_for_inference


class Model:
    """A loaded model (base + adapter, merged, or plain) with its chat template and stop tokens."""

    def __init__(self, loaded: Loaded, gen: GenConfig):
        self.loaded, self.gen = loaded, gen
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    def ask(self, question: str, system: Optional[str] = None,
            history: Optional[List[Dict[str, str]]] = None, **sampling) -> str:
        """One answer; greedy unless do_sample=True (with temperature, top_p, top_k, ...)."""
        return self.ask_many([question], system, history, **sampling)[0]

    def ask_many(self, questions: List[str], system: Optional[str] = None,
                 history: Optional[List[Dict[str, str]]] = None, **sampling) -> List[str]:
        """Answers to several questions, generated in batches."""
        gen = replace(self.gen, **sampling)
        convs = [conversation(q, system or gen.system, history) for q in questions]
        return generate_answers(self.model, self.tokenizer, convs, gen)


def load(adapter: Optional[str] = None, model: Optional[str] = None, *overrides: str) -> Model:
    """Load a run (adapter=RUN_DIR) on its 4-bit base, or a model (a hub id, folder, .gguf or built-in)."""
    from qlora.cli import compose

    args = list(overrides)
    if adapter:
        args.append(f"adapter={adapter}")
    if model:
        args.append(f"model.name_or_path={model}")
    cfg = compose("train", args)
    return Model(load_for_inference(cfg), cfg.gen)
