"""Read training data, check every row, render it with the chat template, and mark trained tokens.

Masking works with any chat template, also those without {% generation %} markers (SmolLM2's): each
assistant turn's text is found as the difference between the conversation rendered up to that turn
with the generation prompt and rendered with the turn, and the tokens of those characters (the
content and its end-of-turn token, not the whitespace after it) are the trained ones.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from qlora.config import DataConfig, DataFormat, LossOn, OnBadRow
from qlora.errors import UserError
from qlora.sources import BadRow, read_rows

ROLES = {"system", "user", "assistant"}
IGNORE = -100  # label of a token that is not trained


@dataclass
class Example:
    messages: List[Dict[str, str]]  # chat formats; empty for plain text
    where: str  # file:line, for error messages
    prompt: str = ""  # prompt_completion: the text before the completion (not trained)
    completion: str = ""  # prompt_completion: the trained text; text: the whole text


@dataclass
class DataStats:
    rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    system_folded: int = 0  # system messages put in the first user turn, where the template has no place
    tokens: int = 0
    trained_tokens: int = 0


def read_examples(path: str, cfg: DataConfig, stats: Optional[DataStats] = None,
                  fmt: Optional[DataFormat] = None, subset: Optional[str] = None,
                  split: Optional[str] = None) -> List[Example]:
    """Every usable row of a data path as an Example; bad rows fail or are dropped by policy."""
    stats = stats if stats is not None else DataStats()
    fmt = fmt or cfg.format
    examples: List[Example] = []
    rows_before, dropped_before = stats.rows, sum(stats.dropped.values())
    for where, row in read_rows(path, subset or cfg.subset, split or cfg.split):
        stats.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            examples.append(to_example(row, fmt, cfg.columns, where))
        except BadRow as e:
            if cfg.on_bad_row is OnBadRow.fail:
                raise UserError(f"{where}: {e} (data.on_bad_row=drop skips such rows)") from None
            stats.dropped[str(e).split(" (")[0]] += 1
    rows, dropped = stats.rows - rows_before, sum(stats.dropped.values()) - dropped_before
    if not examples:
        raise UserError(f"{path}: no usable rows" + (f" ({dropped} dropped)" if dropped else ""))
    if dropped > cfg.max_bad_fraction * rows:
        reasons = "; ".join(f"{n} x {r}" for r, n in stats.dropped.most_common(3))
        raise UserError(f"{path}: dropped {dropped} of {rows} rows, more than data.max_bad_fraction="
                        f"{cfg.max_bad_fraction} ({reasons})")
    return examples


def source_examples(cfg: DataConfig, stats: DataStats) -> List[Tuple[List[Example], float]]:
    """(examples, weight) of data.path, or of each of data.sources."""
    if not cfg.sources:
        return [(read_examples(cfg.path, cfg, stats, cfg.format, cfg.subset, cfg.split), 1.0)]
    return [(read_examples(s.path, cfg, stats, s.format, s.subset, s.split), s.weight) for s in cfg.sources]


def weighted(examples: List[Example], weight: float, rng: random.Random) -> List[Example]:
    """Every example int(weight) times, plus a seeded share (the fraction of weight) once more, in order."""
    whole, part = int(weight), weight - int(weight)
    extra = sorted(rng.sample(range(len(examples)), round(part * len(examples))))
    return examples * whole + [examples[i] for i in extra]


def detect_format(row: dict, columns: Dict[str, str]) -> DataFormat:
    c = columns
    if c["messages"] in row:
        return DataFormat.messages
    if c["conversations"] in row:
        return DataFormat.sharegpt
    if c["instruction"] in row and c["output"] in row:
        return DataFormat.alpaca
    if c["prompt"] in row and c["completion"] in row:
        return DataFormat.prompt_completion
    if c["text"] in row:
        return DataFormat.text
    raise BadRow(f"unknown row format with keys {sorted(row)}; expected {c['messages']!r} (chat), "
                 f"{c['conversations']!r} (ShareGPT), {c['instruction']!r}/{c['output']!r} (alpaca), "
                 f"{c['prompt']!r}/{c['completion']!r} or {c['text']!r} (or set data.columns.NAME=YOUR_COLUMN)")


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def sharegpt_to_messages(turns) -> List[Dict[str, str]]:
    """ShareGPT's [{"from": "human"|"gpt"|"system", "value": ...}] as messages."""
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


def _text(row: dict, column: str, optional: bool = False) -> str:
    value = row.get(column)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(f"{column!r} must be a string" + ("" if column in row else " (missing)"))
    if not optional and not value.strip():
        raise BadRow(f"{column!r} is empty")
    return value


def to_example(row, fmt: DataFormat, columns: Dict[str, str], where: str = "") -> Example:
    """A row of any supported format as a validated Example."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a JSON object, got {type(row).__name__}")
    c = columns
    if fmt is DataFormat.auto:
        fmt = detect_format(row, c)
    if fmt is DataFormat.text:
        return Example([], where, completion=_text(row, c["text"]))
    if fmt is DataFormat.prompt_completion:
        return Example([], where, prompt=_text(row, c["prompt"]),
                       completion=_text(row, c["completion"]))
    if fmt is DataFormat.alpaca:
        instruction, output = _text(row, c["instruction"]), _text(row, c["output"])
        extra = _text(row, c["input"], optional=True)
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        return Example([{"role": "user", "content": user}, {"role": "assistant", "content": output}], where)
    if fmt is DataFormat.sharegpt:
        messages = sharegpt_to_messages(row.get(c["conversations"]))
    else:
        if c["messages"] not in row:  # data.format=messages said so, but the row is of another format
            raise BadRow(f"no {c['messages']!r} in a row with keys {sorted(row)}; data.format=auto detects each "
                         f"row's format (or set data.columns.messages=YOUR_COLUMN)")
        messages = row.get(c["messages"])
        if not isinstance(messages, list) or not messages:
            raise BadRow(f"{c['messages']!r} must be a non-empty list")
    return Example(checked_messages(messages), where)


def to_messages(row, fmt: DataFormat, columns: Optional[Dict[str, str]] = None) -> List[Dict[str, str]]:
    """The validated messages of a chat row (any chat format)."""
    return to_example(row, fmt, columns or DataConfig().columns).messages


def checked_messages(messages: list) -> List[Dict[str, str]]:
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


def render_chat(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """A conversation as the chat template writes it. A template without a system role (Gemma 2's and Mistral
    v0.1's raise on one) gets the system message at the head of the first user turn, as Gemma 3's own template
    puts it; a conversation the template refuses otherwise is a BadRow, with the template's reason."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        if messages and messages[0]["role"] == "system":  # folded, it is refused again if that was not the reason
            return render_chat(tokenizer, fold_system(messages), add_generation_prompt)
        raise BadRow(f"the chat template refuses this conversation: {e}") from None


def system_fits(tokenizer, messages: List[Dict[str, str]]) -> bool:
    """Whether the chat template writes a conversation's system message both in its first answer's prompt and
    in the whole conversation: Gemma 2's raises on a system message; Mistral's (v0.3) writes it with the last
    user turn only, so that it is in that prompt and not in the conversation that goes on past it."""
    from jinja2.exceptions import TemplateError

    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    try:
        prompt = tokenizer.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError:
        return False
    return whole.startswith(prompt)


def fold_system(messages: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """The leading system message moved to the head of the first user turn (system, blank line, user)."""
    rest = list(messages[1:])
    first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first is None:
        raise BadRow("a system message without a user turn, which this chat template has no place for")
    rest[first] = {**rest[first], "content": f"{messages[0]['content']}\n\n{rest[first]['content']}"}
    return rest


def assistant_spans(tokenizer, messages) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (+ end-of-turn)."""
    text = render_chat(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], True)
        upto = render_chat(tokenizer, messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise BadRow("the chat template renders earlier turns differently in later ones; "
                         "assistant tokens cannot be located (use data.loss_on=all)")
        end = len(upto.rstrip())  # the end-of-turn token is trained, the newline after it is not
        spans.append((len(prompt), end))
    return text, spans


def tokenize_example(tokenizer, messages, loss_on: LossOn, max_length: int) -> Dict[str, list]:
    """input_ids and labels (IGNORE where not trained) of a conversation, truncated to max_length."""
    if loss_on is LossOn.all:
        text, spans = render_chat(tokenizer, messages, False), None
    else:
        text, spans = assistant_spans(tokenizer, messages)
        if loss_on is LossOn.completion:
            spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if spans is None:
        labels = list(ids)
    else:
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE
                  for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "length": len(ids)}


def tokenize_plain(tokenizer, prompt: str, completion: str, loss_on: LossOn, max_length: int) -> Dict[str, list]:
    """Plain text (no chat template): the prompt, the completion and EOS; the completion and EOS are
    trained (everything with loss_on=all). For the text format the prompt is empty."""
    enc = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tok if (loss_on is LossOn.all or (start >= len(prompt) and end > start)) else IGNORE
              for tok, (start, end) in zip(ids, enc["offset_mapping"])]
    if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "length": len(ids)}


def tokenize_examples(tokenizer, examples: List[Example], cfg: DataConfig, max_length: int,
                      stats: DataStats, kept: Optional[List[Example]] = None) -> List[Dict[str, list]]:
    """Tokenized rows; `kept`, when given, receives the examples that made it (in row order)."""
    rows = []
    for ex in examples:
        try:
            if ex.messages:
                messages = ex.messages
                if messages[0]["role"] == "system" and not system_fits(tokenizer, messages):
                    messages = fold_system(messages)
                    stats.system_folded += 1
                row = tokenize_example(tokenizer, messages, cfg.loss_on, max_length)
            else:
                row = tokenize_plain(tokenizer, ex.prompt, ex.completion, cfg.loss_on, max_length)
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


def pack_rows(rows: List[Dict[str, list]], max_length: int) -> List[Dict[str, list]]:
    """Several tokenized examples per row of at most max_length tokens (first fit, longest first).

    Each packed row carries position_ids that restart at 0 for every example: transformers reads
    the restarts as sequence boundaries and lets each token attend only within its own example
    (sdpa and eager attention alike; no flash-attention needed). The first token of each example is
    never a label, so no example learns to predict the next one."""
    bins: List[Dict[str, list]] = []
    for r in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(r["input_ids"])
        home = next((b for b in bins if len(b["input_ids"]) + n <= max_length), None)
        if home is None:
            home = {"input_ids": [], "labels": [], "position_ids": []}
            bins.append(home)
        home["input_ids"] += r["input_ids"]
        home["labels"] += [IGNORE] + r["labels"][1:]
        home["position_ids"] += list(range(n))
    return bins


def collate_packed(rows: List[Dict[str, list]], pad_id: int, one_row: bool = False) -> dict:
    """A micro-batch of packed rows (from pack_rows, or single examples) in which positions restart
    at every example, so that transformers (given no attention mask) keeps attention within each.

    For sdpa and eager attention, rows stay rows, padded to the longest with pad_id (positions restart
    at the padding too): the block-diagonal mask costs rows x length^2, not (rows x length)^2 as one
    long row would. one_row=True lays the rows end to end instead: flash-attention reads restarts
    only in a batch of one row, and its variable-length kernel needs no mask; data.padding_free does
    so with single examples, attended one by one (qlora/padding_free.py). Padding is never a
    label, and a pad_id distinct from EOS (models.load_tokenizer) keeps the token count exact."""
    import torch

    width = 0 if one_row else max(len(r["input_ids"]) for r in rows)
    ids, labels, positions = [], [], []
    for r in rows:
        n, pad = len(r["input_ids"]), max(0, width - len(r["input_ids"]))
        ids.append(r["input_ids"] + [pad_id] * pad)
        labels.append([IGNORE] + r["labels"][1:] + [IGNORE] * pad)
        positions.append((r.get("position_ids") or list(range(n))) + list(range(pad)))
    if one_row:
        ids, labels, positions = ([sum(x, [])] for x in (ids, labels, positions))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def split_examples(cfg: DataConfig, seed: int) -> Tuple[List[Example], List[Example], DataStats]:
    """Training and held-out examples: from data.eval_path, or a seeded share of each source, held
    out before the mixture weights repeat rows (so no held-out row is also trained on)."""
    stats = DataStats()
    train: List[Example] = []
    held: List[Example] = []
    for i, (examples, weight) in enumerate(source_examples(cfg, stats)):
        if not cfg.eval_path and cfg.eval_fraction > 0:
            order = list(range(len(examples)))
            random.Random(seed + i).shuffle(order)
            k = max(1, int(len(examples) * cfg.eval_fraction))
            held += [examples[j] for j in sorted(order[:k])]
            examples = [examples[j] for j in sorted(order[k:])]
        train += weighted(examples, weight, random.Random(seed + i))
    if cfg.eval_path:
        held = read_examples(cfg.eval_path, cfg, split=cfg.eval_split)
    return train, held, stats


def prompt_and_answer(ex: Example):
    """What generation starts from (the conversation up to its last assistant turn, or the plain
    prompt) and the reference answer, for exact match."""
    if ex.messages:
        return ex.messages[:-1], ex.messages[-1]["content"]
    return ex.prompt, ex.completion
