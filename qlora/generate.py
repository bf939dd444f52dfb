"""Batched generation with the chat template the model was trained with (left padding, stop tokens)."""
from __future__ import annotations

from typing import Dict, List, Optional

from qlora.config import GenConfig
from qlora.models import stop_token_ids


def generate_answers(model, tokenizer, conversations: List[List[Dict[str, str]]], gen: GenConfig,
                     max_new_tokens: Optional[int] = None, batch_size: int = 8,
                     desc: Optional[str] = None) -> List[str]:
    """One answer per conversation (each ending with a user turn), greedy unless gen.do_sample."""
    import torch
    from tqdm.auto import tqdm

    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched decoding needs left padding
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k) \
        if gen.do_sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    answers: List[str] = []
    try:
        batches = range(0, len(conversations), batch_size)
        for i in tqdm(batches, desc=desc, disable=desc is None, unit="batch"):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens or gen.max_new_tokens,
                                     repetition_penalty=gen.repetition_penalty, eos_token_id=stops,
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
