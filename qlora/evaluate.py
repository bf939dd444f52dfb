"""Held-out quality: greedy exact match of the last assistant turn."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from qlora.config import EvalConfig, GenConfig
from qlora.data import Example, prompt_and_answer
from qlora.generate import generate_answers


def graded_answers(model, tokenizer, examples: List[Example], cfg: EvalConfig,
                   desc: str = "exact match") -> List[Dict[str, Any]]:
    """Greedy answers to the examples (the first eval.max_examples), each with its prompt, the reference
    and whether the two are equal, whitespace-trimmed: what exact match counts, and what a person reads
    to see where a run goes wrong."""
    examples = examples[: cfg.max_examples] if cfg.max_examples else examples
    prompts, refs = zip(*(prompt_and_answer(ex) for ex in examples))
    answers = generate_answers(model, tokenizer, list(prompts), GenConfig(do_sample=False),
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, desc=desc)
    return [{"prompt": p, "reference": r.strip(), "answer": a, "match": a == r.strip()}
            for p, r, a in zip(prompts, refs, answers)]


def matched_share(graded: List[Dict[str, Any]]) -> float:
    """Exact match: the share of graded answers equal to their reference."""
    return sum(g["match"] for g in graded) / len(graded)


def write_answers(path, graded: List[Dict[str, Any]], before: Optional[List[Dict[str, Any]]] = None) -> None:
    """One JSON line per graded answer; with `before` (the base's answers to the same prompts), those too."""
    import json

    from qlora.tracking import write_atomic

    rows = [dict(g, answer_before=b["answer"], match_before=b["match"]) for g, b in zip(graded, before)] \
        if before else graded
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


LOGITS_BYTES = 1 << 30
"""The most fp32 logits (with cross-entropy's copy of them) mean_loss holds at once."""


def mean_loss(model, rows, batch_size: int = 8, desc: str = "held-out loss") -> float:
    """Mean cross-entropy per trained token (the same tokens training counts). Logits are computed
    only where a trained token is predicted (transformers' logits_to_keep mask), and a batch takes
    fewer rows where theirs would pass LOGITS_BYTES: a 128k-token vocabulary makes 1 GiB of fp32
    logits for 2048 positions, which a training that fits (its head never holds them) need not have."""
    import torch
    from tqdm.auto import tqdm

    from qlora.data import IGNORE

    vocab = model.get_output_embeddings().weight.shape[0]
    per_row = [sum(label != IGNORE for label in r["labels"][1:]) * vocab * 8 for r in rows]
    total, count, i = 0.0, 0, 0
    model.eval()
    with torch.no_grad(), tqdm(total=len(rows), desc=desc, unit="row") as bar:
        while i < len(rows):
            n = 1
            while n < batch_size and i + n < len(rows) and sum(per_row[i:i + n + 1]) <= LOGITS_BYTES:
                n += 1
            batch, i = rows[i:i + n], i + n
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, r in enumerate(batch):
                k = len(r["input_ids"])
                ids[j, :k], labels[j, :k], mask[j, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            targets = labels[:, 1:]
            keep = torch.zeros(len(batch), width, dtype=torch.bool)
            keep[:, :-1] = targets != IGNORE  # the positions that predict a trained token
            if keep.any():
                logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                               logits_to_keep=keep.to(model.device)).logits.float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab),
                                                         targets[keep[:, :-1]].to(logits.device), reduction="sum")
                total += loss.item()
                count += int(keep.sum())
            bar.update(n)
    return total / max(count, 1)


def held_out_of_run(cfg):
    """(examples, the run's config, what they are) that `qlora eval adapter=RUN` scores when data.path
    is left at the demo's: the run's own held-out data (its data.eval_path, or the seeded share
    data.eval_fraction held out), or None where there is no run or it held nothing out."""
    from qlora.adapters import adapter_dir
    from qlora.config import on_demo_data
    from qlora.data import split_examples
    from qlora.inference import run_config

    if not cfg.adapter or not on_demo_data(cfg.data):
        return None
    trained = run_config(adapter_dir(cfg.adapter))
    if trained is None or not (trained.data.eval_path or trained.data.eval_fraction > 0):
        return None
    _, held, _ = split_examples(trained.data, trained.train.seed)
    what = trained.data.eval_path or f"the run's held-out share (data.eval_fraction={trained.data.eval_fraction})"
    return held, trained, what


def evaluate_cli(cfg) -> int:
    """`qlora eval`: loss and greedy exact match of a run (or a model) on data.path, as JSON; with
    adapter=RUN and no data.path, on the run's held-out data."""
    import json
    from pathlib import Path

    from qlora.data import DataStats, read_examples, tokenize_examples
    from qlora.errors import UserError
    from qlora.inference import load_for_inference
    from qlora.models import say
    from qlora.sources import check_path
    from qlora.validation import refuse, validate_eval

    refuse(validate_eval(cfg.eval))
    held = held_out_of_run(cfg)
    if held:
        examples, trained, what = held
        data, max_length = trained.data, trained.train.max_length
        say(f"eval: the run's held-out data, {what} (data.path=FILE for other data)")
    else:
        problem = check_path("data.path", cfg.data.path)
        if problem:
            raise UserError(problem)
        examples, what = read_examples(cfg.data.path, cfg.data), cfg.data.path
        data, max_length = cfg.data, cfg.train.max_length
    loaded = load_for_inference(cfg, chat=any(ex.messages for ex in examples))
    rows = tokenize_examples(loaded.tokenizer, examples, data, max_length, DataStats())
    result = {
        "model": loaded.name, "data": str(what), "examples": len(examples),
        "loss": round(mean_loss(loaded.model, rows), 6),
    }
    graded = graded_answers(loaded.model, loaded.tokenizer, examples, cfg.eval)
    result.update(exact_match=matched_share(graded), exact_match_examples=len(graded))
    text = json.dumps(result, indent=2)
    if cfg.output_dir:
        from qlora.tracking import write_atomic

        out = Path(cfg.output_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "eval.json", text + "\n")
        write_answers(out / "answers.jsonl", graded)
    print(text)
    return 0
