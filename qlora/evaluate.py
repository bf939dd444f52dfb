"""Held-out quality: greedy exact match of the last assistant turn."""
from __future__ import annotations

from typing import List

from qlora.config import EvalConfig, GenConfig
from qlora.data import Example, prompt_and_answer
from qlora.generate import generate_answers


def exact_match(model, tokenizer, examples: List[Example], cfg: EvalConfig, desc: str = "exact match") -> float:
    """Share of examples whose greedy answer equals the reference (whitespace-trimmed)."""
    examples = examples[: cfg.max_examples] if cfg.max_examples else examples
    prompts, refs = zip(*(prompt_and_answer(ex.messages) for ex in examples))
    answers = generate_answers(model, tokenizer, list(prompts), GenConfig(do_sample=False),
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, desc=desc)
    return sum(a == r.strip() for a, r in zip(answers, refs)) / len(refs)
