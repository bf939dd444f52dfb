"""Batched generation with the chat template the model was trained with (left padding, stop tokens)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

from qlora.config import GenConfig
from qlora.data import render_chat
from qlora.models import stop_token_ids
from qlora.validation import refuse, validate_gen


def sampling_kwargs(gen: GenConfig) -> dict:
    """generate() arguments for sampling, or for greedy decoding (with the sampling knobs unset)."""
    refuse(validate_gen(gen))
    if gen.do_sample:
        return dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def generate_answers(model, tokenizer, conversations: List[Union[str, List[Dict[str, str]]]], gen: GenConfig,
                     max_new_tokens: Optional[int] = None, batch_size: int = 8,
                     desc: Optional[str] = None) -> List[str]:
    """One answer per conversation (each ending with a user turn) or plain-text prompt, greedy unless
    gen.do_sample."""
    import torch
    from tqdm.auto import tqdm

    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched decoding needs left padding
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    sampling = sampling_kwargs(gen)
    was_training = model.training
    model.eval()
    answers: List[str] = []
    try:
        batches = range(0, len(conversations), batch_size)
        for i in tqdm(batches, desc=desc, disable=desc is None, unit="batch"):
            batch = conversations[i:i + batch_size]
            plain = isinstance(batch[0], str)  # prompt_completion data: the prompt as written, no template
            texts = batch if plain else [render_chat(tokenizer, c, add_generation_prompt=True) for c in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=plain).to(model.device)
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


def read_prompts(path: str) -> List[Tuple[List[Dict[str, str]], Optional[str]]]:
    """A prompts file: one JSON object per line, {"prompt": "..."} or {"messages": [...]}; as
    (conversation, reference) pairs. Messages that end with an assistant turn (a held-out data file)
    are answered from the user turn before it, that assistant turn kept as the reference."""
    import json
    from pathlib import Path

    from qlora.errors import UserError

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"gen.prompts={path}: no such file")
    out = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        reference = None
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str):
            messages, reference = messages[:-1], messages[-1]["content"]
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            out.append(([{"role": "user", "content": row["prompt"]}], None))
        elif isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in
                ("system", "user", "assistant") for m in messages) and messages[-1]["role"] == "user":
            out.append(([{"role": m["role"], "content": m["content"]} for m in messages], reference))
        else:
            raise UserError(f"{where}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}} "
                            "ending with a user message (or with an assistant one after it, kept as the reference)")
    if not out:
        raise UserError(f"{file}: no prompts")
    return out


def generate_cli(cfg) -> int:
    """`qlora generate`: one answer on stdout, or a JSONL file of prompts answered in batches."""
    import json

    from qlora.errors import UserError
    from qlora.inference import conversation, load_for_inference
    from qlora.outputs import claim_output_dir

    gen = cfg.gen
    if bool(gen.prompt) == bool(gen.prompts):
        raise UserError("give one of prompt=\"TEXT\" or prompts=FILE.jsonl")
    refuse(validate_gen(gen))
    if gen.prompts:
        convs, references = map(list, zip(*read_prompts(gen.prompts)))
        if gen.system:
            convs = [c if c[0]["role"] == "system" else [{"role": "system", "content": gen.system}] + c
                     for c in convs]
        out_dir = claim_output_dir(cfg, required=False)
    loaded = load_for_inference(cfg)
    if gen.prompt:
        print(generate_answers(loaded.model, loaded.tokenizer, [conversation(gen.prompt, gen.system)], gen)[0])
        return 0
    answers = generate_answers(loaded.model, loaded.tokenizer, convs, gen, batch_size=8, desc="generating")
    lines = "".join(json.dumps({"messages": c, "answer": a, **({"reference": r} if r is not None else {})}) + "\n"
                    for c, a, r in zip(convs, answers, references))
    if out_dir is None:
        print(lines, end="")
        return 0
    from qlora.tracking import write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "generations.jsonl", lines)
    print(out_dir / "generations.jsonl")
    return 0
