"""`qlora data check`: what training will see, before it trains.

Renders examples with trained and masked tokens told apart, and audits the whole set: rows dropped
and why, truncation at train.max_length, token lengths (with a histogram), examples left with no
trained token, whether every assistant turn ends in a trained end-of-turn token, pad != EOS, and
whether the inference prompt (add_generation_prompt=True) is a token-exact prefix of the training
rendering (train and serve with the same format). Training runs the same audit and stops on the
fatal findings.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from qlora.data import IGNORE, DataStats, Example, render_chat, tokenize_examples
from qlora.errors import UserError
from qlora.models import stop_token_ids

GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


@dataclass
class Audit:
    examples: int = 0
    lengths: List[int] = field(default_factory=list)
    truncated: int = 0
    system_folded: int = 0
    no_trained_token: int = 0
    turns: int = 0
    turns_without_trained_stop: int = 0
    prefix_mismatches: int = 0
    first_prefix_mismatch: Optional[str] = None
    pad_is_eos: bool = False
    dropped: Dict[str, int] = field(default_factory=dict)

    def fatal(self) -> List[str]:
        """Findings that make training pointless or harmful, each with its fix."""
        out = []
        if self.pad_is_eos:
            out.append("pad == EOS: the model would never learn to stop; give the tokenizer a pad token")
        if self.examples and self.no_trained_token == self.examples:
            out.append("no example has a trained token: check data.loss_on and train.max_length")
        if self.turns_without_trained_stop:
            out.append(f"{self.turns_without_trained_stop} of {self.turns} assistant turns do not end in a trained "
                       "end-of-turn token: generation would not stop; check the chat template (model.chat_template)")
        if self.prefix_mismatches:
            out.append(f"{self.prefix_mismatches} examples render their prompt differently at inference than in "
                       f"training ({self.first_prefix_mismatch}); fix the chat template (model.chat_template)")
        return out

    def summary(self) -> Dict[str, object]:
        lengths = sorted(self.lengths) or [0]
        return dict(
            examples=self.examples, dropped=self.dropped, truncated=self.truncated, system_folded=self.system_folded,
            truncation_rate=round(self.truncated / max(self.examples, 1), 4),
            no_trained_token=self.no_trained_token,
            length_min=lengths[0], length_median=statistics.median(lengths),
            length_p95=lengths[int(0.95 * (len(lengths) - 1))], length_max=lengths[-1],
            assistant_turns=self.turns, turns_without_trained_stop=self.turns_without_trained_stop,
            prefix_mismatches=self.prefix_mismatches, pad_is_eos=self.pad_is_eos)


def audit(tokenizer, examples: List[Example], rows: List[Dict[str, list]], stats: DataStats,
          max_length: int) -> Audit:
    """Check tokenized rows (as tokenize_examples made them) against their examples."""
    a = Audit(examples=stats.rows - sum(stats.dropped.values()), truncated=stats.truncated,
              system_folded=stats.system_folded, dropped=dict(stats.dropped),
              pad_is_eos=tokenizer.pad_token_id == tokenizer.eos_token_id)
    a.no_trained_token = stats.dropped.get("no trained token within max_length", 0)
    stops = set(stop_token_ids(tokenizer))
    for ex, row in zip(examples, rows):
        ids, labels = row["input_ids"], row["labels"]
        a.lengths.append(len(ids))
        if IGNORE not in labels:  # data.loss_on=all: the row must hold a trained stop token somewhere
            a.turns += 1
            a.turns_without_trained_stop += len(ids) < max_length and not stops.intersection(ids)
        else:  # each run of trained tokens is one assistant turn; it must end in an end-of-turn token
            runs = [i for i in range(len(labels))
                    if labels[i] != IGNORE and (i + 1 == len(labels) or labels[i + 1] == IGNORE)]
            a.turns += len(runs)
            a.turns_without_trained_stop += sum(ids[i] not in stops for i in runs if i + 1 < max_length)
        if not ex.messages:  # plain text: no chat template to agree with
            continue
        prompt = render_chat(tokenizer, ex.messages[:-1], add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if len(prompt_ids) < len(ids) and ids[: len(prompt_ids)] != prompt_ids:
            a.prefix_mismatches += 1
            a.first_prefix_mismatch = a.first_prefix_mismatch or ex.where
    return a


def show(tokenizer, row: Dict[str, list], color: bool) -> str:
    """The rendered example: trained tokens green (or in [[ ]]), masked ones dim."""
    out, trained = [], None
    for tok, label in zip(row["input_ids"], row["labels"]):
        now = label != IGNORE
        if now != trained:
            if color:
                out.append(GREEN if now else DIM)
            elif trained is not None or now:
                out.append("[[" if now else "]]")
            trained = now
        out.append(tokenizer.decode([tok]))
    if color:
        out.append(RESET)
    elif trained:
        out.append("]]")
    return "".join(out)


def check_for_training(tokenizer, examples: List[Example], rows, stats: DataStats, max_length: int) -> Audit:
    """The audit training runs: fatal findings stop it before the model loads."""
    a = audit(tokenizer, examples, rows, stats, max_length)
    problems = a.fatal()
    if problems:
        raise UserError("the data would train a broken model (qlora data check shows why):\n  "
                        + "\n  ".join(problems))
    return a


def data_check_cli(cfg) -> int:
    """The `qlora data check` verb: same config and overrides as train."""
    from qlora.data import split_examples
    from qlora.models import load_tokenizer, resolve_model
    from qlora.outputs import claim_output_dir
    from qlora.validation import refuse, validate_train

    refuse(validate_train(cfg))
    out = claim_output_dir(cfg, required=False)
    train_ex, _, stats = split_examples(cfg.data, cfg.train.seed)
    tokenizer = load_tokenizer(resolve_model(cfg.model.name_or_path, weights=False), cfg.model,
                               chat=any(ex.messages for ex in train_ex))
    kept: List[Example] = []
    rows = tokenize_examples(tokenizer, train_ex, cfg.data, cfg.train.max_length, stats, kept)
    a = audit(tokenizer, kept, rows, stats, cfg.train.max_length)
    color = sys.stdout.isatty()
    for i, row in enumerate(rows[: cfg.data.show_examples]):
        print(f"--- example {i + 1} ({kept[i].where}); trained tokens {'in green' if color else 'in [[ ]]'}")
        print(show(tokenizer, row, color))
    summary = a.summary()
    print("\n--- audit")
    for key, value in summary.items():
        print(f"{key}: {value}")
    fatal = a.fatal()
    print("\n" + ("FATAL:\n  " + "\n  ".join(fatal) if fatal else "no fatal finding: ready to train"))
    if out is not None:
        from qlora.tracking import write_atomic

        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "data_check.json", json.dumps({**summary, "fatal": fatal}, indent=2) + "\n")
        plot_lengths(a.lengths, cfg.train.max_length, out / "lengths.png")
    return 2 if fatal else 0


def plot_lengths(lengths: List[int], max_length: int, path) -> None:
    from qlora.tracking import new_figure, save_figure

    fig, ax = new_figure((7, 4))
    ax.hist(lengths, bins=40)
    ax.axvline(max_length, color="red", linestyle="--", label=f"train.max_length={max_length}")
    ax.set_xlabel("tokens per example (after truncation)")
    ax.set_ylabel("examples")
    ax.legend()
    save_figure(fig, path)
