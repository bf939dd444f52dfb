"""Read training data, check every row, render it with the chat template, and mark trained tokens.

Masking works with any chat template, also those without {% generation %} markers (SmolLM2's): each
assistant turn's text is found as the difference between the conversation rendered up to that turn
with the generation prompt and rendered with the turn, and the tokens of those characters (the
content and its end-of-turn token, not the whitespace after it) are the trained ones.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from qlora.config import DataConfig, DataFormat, LossOn, OnBadRow
from qlora.errors import UserError

ROLES = {"system", "user", "assistant"}
IGNORE = -100  # label of a token that is not trained


class BadRow(ValueError):
    """A row that cannot be used; the message says why."""


@dataclass
class Example:
    messages: List[Dict[str, str]]
    where: str  # file:line, for error messages


@dataclass
class DataStats:
    rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def read_examples(path: str, cfg: DataConfig, stats: Optional[DataStats] = None) -> List[Example]:
    """Every usable row of a JSONL file as chat messages; bad rows fail or are dropped by policy."""
    stats = stats if stats is not None else DataStats()
    examples: List[Example] = []
    file = Path(path).expanduser()
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            stats.rows += 1
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRow(f"malformed JSON ({e.msg} at column {e.colno})") from None
                examples.append(Example(to_messages(row, cfg.format), where))
            except BadRow as e:
                if cfg.on_bad_row is OnBadRow.fail:
                    raise UserError(f"{where}: {e} (data.on_bad_row=drop skips such rows)") from None
                stats.dropped[str(e).split(" (")[0]] += 1
    if not examples:
        raise UserError(f"{file}: no usable rows (data.path / data.eval_path)")
    dropped = sum(stats.dropped.values())
    if dropped > cfg.max_bad_fraction * stats.rows:
        reasons = "; ".join(f"{n} x {r}" for r, n in stats.dropped.most_common(3))
        raise UserError(f"{file}: dropped {dropped} of {stats.rows} rows, more than data.max_bad_fraction="
                        f"{cfg.max_bad_fraction} ({reasons})")
    return examples


def detect_format(row: dict) -> DataFormat:
    if "messages" in row:
        return DataFormat.messages
    if "instruction" in row and "output" in row:
        return DataFormat.alpaca
    if "conversations" in row:
        return DataFormat.sharegpt
    raise BadRow(f"unknown row format with keys {sorted(row)}; expected 'messages' (chat), "
                 "'conversations' (ShareGPT) or 'instruction'/'output' (alpaca)")


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def sharegpt_to_messages(row: dict) -> List[Dict[str, str]]:
    """ShareGPT's {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]} as messages."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("'conversations' must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise BadRow(f"turn {i} needs 'from' and 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise BadRow(f"turn {i} has unknown 'from' {t['from']!r}; use system, human or gpt")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return out


def to_messages(row, fmt: DataFormat) -> List[Dict[str, str]]:
    """A row of any supported format as a validated list of {role, content} messages."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a JSON object, got {type(row).__name__}")
    if fmt is DataFormat.auto:
        fmt = detect_format(row)
    if fmt is DataFormat.alpaca:
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise BadRow(f"alpaca row needs a non-empty string '{key}'")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise BadRow("alpaca 'input' must be a string")
        user = row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    messages = sharegpt_to_messages(row) if fmt is DataFormat.sharegpt else row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(f"message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRow(f"message {i} has unknown role {m['role']!r}; use system, user or assistant")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise BadRow(f"message {i} ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise BadRow("the conversation does not end with an assistant message")
    if not any(m["role"] == "user" for m in out):
        raise BadRow("the conversation has no user message")
    return out


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (+ end-of-turn)."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise BadRow("the chat template renders earlier turns differently in later ones; "
                         "assistant tokens cannot be located (use data.loss_on=all)")
        end = len(upto.rstrip())  # the end-of-turn token is trained, the newline after it is not
        spans.append((len(prompt), end))
    return text, spans


def tokenize_example(tokenizer, messages, loss_on: LossOn, max_length: int) -> Dict[str, list]:
    """input_ids and labels (IGNORE where not trained), truncated to max_length."""
    if loss_on is LossOn.all:
        text, spans = _render(tokenizer, messages, False), None
    else:
        text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if spans is None:
        labels = list(ids)
    else:
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE
                  for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "length": len(ids)}


def tokenize_examples(tokenizer, examples: List[Example], cfg: DataConfig, max_length: int,
                      stats: DataStats, kept: Optional[List[Example]] = None) -> List[Dict[str, list]]:
    """Tokenized rows; `kept`, when given, receives the examples that made it (in row order)."""
    rows = []
    for ex in examples:
        try:
            row = tokenize_example(tokenizer, ex.messages, cfg.loss_on, max_length)
        except BadRow as e:
            raise UserError(f"{ex.where}: {e}") from None
        if row.pop("length") > max_length:
            stats.truncated += 1
        if not any(label != IGNORE for label in row["labels"]):
            if cfg.on_bad_row is OnBadRow.fail:
                raise UserError(f"{ex.where}: no trained token left within train.max_length={max_length}; "
                                "raise train.max_length or set data.on_bad_row=drop")
            stats.dropped["no trained token within max_length"] += 1
            continue
        stats.tokens += len(row["input_ids"])
        stats.trained_tokens += sum(label != IGNORE for label in row["labels"])
        rows.append(row)
        if kept is not None:
            kept.append(ex)
    return rows


def split_examples(cfg: DataConfig, seed: int) -> Tuple[List[Example], List[Example], DataStats]:
    """Training and held-out examples: from data.eval_path, or a seeded share of data.path."""
    stats = DataStats()
    train = read_examples(cfg.path, cfg, stats)
    if cfg.eval_path:
        held = read_examples(cfg.eval_path, cfg)
    elif cfg.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        k = max(1, int(len(train) * cfg.eval_fraction))
        held = [train[i] for i in sorted(order[:k])]
        train = [train[i] for i in sorted(order[k:])]
    else:
        held = []
    return train, held, stats


def prompt_and_answer(messages: List[Dict[str, str]]) -> Tuple[List[Dict[str, str]], str]:
    """The conversation up to its last assistant turn, and that turn's content (for exact match)."""
    return messages[:-1], messages[-1]["content"]
