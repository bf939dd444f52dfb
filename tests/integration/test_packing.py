"""Packing: several examples per row, each attending only to itself. Exact, not approximately so."""
import pytest
import torch

from qlora.config import LossOn
from qlora.data import IGNORE, collate_packed, pack_rows, tokenize_example
from tests.conftest import make_tokenizer, people_rows, tiny_overrides, write_jsonl


def per_token_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE, reduction="none")


def segments(positions):
    """(start, length) of each example in a packed row, from where its positions restart."""
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return list(zip(starts, [b - a for a, b in zip(starts, starts[1:])]))


@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one-row"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "segments"])
def test_each_example_in_a_packed_batch_has_the_loss_it_has_alone(tiny_model, attn, one_row):
    """Rows of unequal width, padded (sdpa, eager), or laid end to end as flash-attention and
    data.padding_free want (that layout is checked here under sdpa and eager, which read it the same
    way). "segments" is data.padding_free's attention, example by example in one row (in padded rows,
    transformers' SDPA with its mask): the GQA model here checks its grouped heads too."""
    from transformers import AutoModelForCausalLM

    from qlora.padding_free import segment_attention_for

    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa" if attn == "segments" else attn,
                                                 dtype=torch.float32).eval()
    model.forward = segment_attention_for(model, attn == "segments")(model.forward)
    rows = [tokenize_example(tok, r["messages"], LossOn.all, 128) for r in people_rows(7)]
    for r in rows:
        r.pop("length")
    bins = pack_rows(rows, 2 * max(len(r["input_ids"]) for r in rows))
    widths = [len(b["input_ids"]) for b in bins]
    assert len(bins) >= 2 and len(set(widths)) > 1, "the micro-batch needs rows of unequal width (padding)"
    batch = collate_packed(bins, pad_id=tok.pad_token_id, one_row=one_row)
    assert batch["input_ids"].shape == ((1, sum(widths)) if one_row else (len(bins), max(widths)))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    checked = 0
    for i, b in enumerate(bins):
        row, at = (0, sum(widths[:i])) if one_row else (i, 0)
        together = per_token_loss(logits[row, at:at + widths[i]], batch["labels"][row, at:at + widths[i]])
        for start, n in segments(b["position_ids"]):
            ids, labels = b["input_ids"][start:start + n], b["labels"][start:start + n]
            with torch.no_grad():
                alone = per_token_loss(model(input_ids=torch.tensor([ids])).logits[0], torch.tensor(labels))
            inside = together[start:start + n - 1]  # the n-1 predictions within the example
            assert torch.allclose(inside, alone, atol=1e-5), (attn, (inside - alone).abs().max())
            checked += 1
    assert checked == len(rows)
    assert (batch["labels"][batch["input_ids"] == tok.pad_token_id] == IGNORE).all(), "padding is never a label"


def test_packed_rows_fit_and_never_predict_across_examples():
    rows = [{"input_ids": [1] * n, "labels": [5] * n} for n in (60, 50, 40, 30, 20, 10)]
    bins = pack_rows(rows, 100)
    assert all(len(b["input_ids"]) <= 100 for b in bins) and sum(len(b["input_ids"]) for b in bins) == 210
    assert len(bins) == 3
    for b in bins:
        starts = [i for i, p in enumerate(b["position_ids"]) if p == 0]
        assert all(b["labels"][i] == IGNORE for i in starts)


def test_a_packed_run_trains_the_same_adapter_as_an_unpacked_one(tiny_model, tmp_path):
    """Every step sees all 8 examples either way (one batch of 8, or one batch of all packed rows), so
    the summed loss and the update are the same; only the arithmetic order differs."""
    from safetensors.torch import load_file

    from qlora.cli import compose
    from qlora.train import fit

    data = (write_jsonl(tmp_path / "t.jsonl", people_rows(8, seed=3)),
            write_jsonl(tmp_path / "e.jsonl", people_rows(2)))
    adapters, tokens = {}, {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        cfg = compose("train", tiny_overrides(tiny_model, data, out, **{
            "train.max_steps": 3, "train.per_device_train_batch_size": 8, "train.save_steps": 100,
            "data.packing": str(packing).lower()}))
        run = fit(cfg)
        adapters[packing] = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
        tokens[packing] = run.report["train_tokens"]
    assert tokens[True] == tokens[False] > 0  # packed rows carry no padding to count
    for name, unpacked in adapters[False].items():
        diff = (adapters[True][name] - unpacked).abs().max().item()
        assert diff < 1e-4, (name, diff)
    assert any((t.abs() > 0).any() for k, t in adapters[True].items() if "lora_B" in k)


def test_a_padding_free_run_trains_the_same_adapter_and_losses_as_a_padded_one(tiny_model, tmp_path, capsys):
    """data.padding_free: the same examples in each micro-batch, laid end to end in one row instead of
    padded rows, attended example by example: the same losses and update up to float rounding, and
    the same count of trained-through tokens (padding is not counted either way)."""
    import json

    from safetensors.torch import load_file

    from qlora.cli import compose
    from qlora.padding_free import NAME
    from qlora.train import fit

    data = (write_jsonl(tmp_path / "t.jsonl", people_rows(12, seed=5)),
            write_jsonl(tmp_path / "e.jsonl", people_rows(2)))
    adapters, tokens, losses = {}, {}, {}
    for free in ("false", "true"):
        out = tmp_path / f"free-{free}"
        run = fit(compose("train", tiny_overrides(tiny_model, data, out, **{
            "train.max_steps": 3, "train.save_steps": 2, "data.padding_free": free})))
        adapters[free] = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
        tokens[free] = run.report["train_tokens"]
        lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[free] = [r["loss"] for r in lines if "loss" in r]
        said = capsys.readouterr().err
        assert ("data.padding_free: each micro-batch's examples end to end" in said) == (free == "true")
        assert "(0% of a padded" not in said, "these rows' lengths vary: padded micro-batches hold padding"
        saved = "".join(f.read_text() for f in run.run_dir.rglob("*.json"))
        assert NAME not in saved and run.trainer.model.config._attn_implementation == "sdpa", "restored after training"
        assert run.report["padding_free_attention"] == {"true": "per-example SDPA", "false": None}[free]  # on CPU
    assert tokens["true"] == tokens["false"] > 0
    assert len(losses["true"]) == 3 and losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    for name, padded in adapters["false"].items():
        diff = (adapters["true"][name] - padded).abs().max().item()
        assert diff < 1e-5, (name, diff)
    assert any((t.abs() > 0).any() for k, t in adapters["true"].items() if "lora_B" in k)
