"""The Python API for notebooks: every verb, with the command line's overrides, and chat.

    from qlora import api
    run_dir = api.train("recipe=smollm2_demo", "train.max_steps=20")
    bot = api.load(adapter=run_dir)
    bot.ask("What is the capital of France?")
    api.run("merge", f"adapter={run_dir}", "output_dir=merged")

Mistakes raise qlora.errors.UserError with the same one-line message the command line prints. A call
that finds the hub unreachable reads the cache only until it returns (hub.hub_switch_restored).
"""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Dict, List, Optional

from qlora.config import GenConfig
from qlora.generate import generate_answers
from qlora.inference import Loaded, conversation, load_for_inference
from qlora.hub import hub_switch_restored


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
        gen = replace(self.gen, **_checked_sampling(sampling))
        convs = [conversation(q, system or gen.system, history) for q in questions]
        return generate_answers(self.model, self.tokenizer, convs, gen)


def _checked_sampling(sampling: Dict[str, object]) -> Dict[str, object]:
    """The sampling settings of ask/ask_many, refused with a UserError when a name is not one of
    qlora chat's /set settings or a value is not of the setting's type."""
    from qlora.chat import SETTABLE
    from qlora.errors import UserError

    kinds = {f.name: f.type for f in fields(GenConfig)}
    for key, value in sampling.items():
        if key not in SETTABLE - {"show_speed"}:
            raise UserError(f"ask({key}=...): not a sampling setting; use "
                            f"{', '.join(sorted(SETTABLE - {'show_speed'}))}")
        kind = {"bool": bool, "int": int, "float": (int, float)}[kinds[key]]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise UserError(f"ask({key}={value!r}): expected {'True or False' if kind is bool else 'a number'}")
    return sampling


@hub_switch_restored()
def load(*overrides: str, adapter: Optional[str] = None, model: Optional[str] = None) -> Model:
    """Load a run (adapter=RUN_DIR) on its 4-bit base, or a model (a hub id, folder, .gguf or built-in;
    add "quant=none" for a merged model in 16 bits), with any other overrides ("gen.max_new_tokens=64")."""
    from qlora.cli import compose

    args = list(overrides)
    if adapter:
        args.append(f"adapter={adapter}")
    if model:
        args.append(f"model.name_or_path={model}")
    cfg = compose("train", args)
    return Model(load_for_inference(cfg), cfg.gen)


@hub_switch_restored()
def train(*overrides: str) -> Path:
    """`qlora train` with these overrides; returns the run directory."""
    from qlora.cli import compose
    from qlora.train import fit

    return fit(compose("train", list(overrides))).run_dir


@hub_switch_restored()
def sweep(*overrides: str) -> Path:
    """`qlora train --multirun` with these overrides (keys given several values, e.g. "lora.r=8,16");
    returns the sweep folder, which holds sweep.json, sweep.md and sweep.png."""
    from qlora.sweep import run_sweep

    return run_sweep(list(overrides))


@hub_switch_restored()
def run(verb: str, *overrides: str) -> None:
    """Any verb as the command line runs it, e.g. run("data check", "data.path=my.jsonl")."""
    from qlora.cli import VERBS, _runner, compose
    from qlora.errors import UserError

    if verb not in VERBS or verb == "recipes":
        raise UserError(f"unknown verb {verb!r}; choose one of: {', '.join(v for v in VERBS if v != 'recipes')}")
    code = _runner(verb)(compose(VERBS[verb][1], list(overrides)))
    if code:
        raise UserError(f"qlora {verb} exited with {code}")
