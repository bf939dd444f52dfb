"""Packing: several examples per row, each attending only to itself. Exact, not approximately so."""
import pytest
import torch

from qlora.config import LossOn
from qlora.data import IGNORE, collate_packed, pack_rows, tokenize_example
from tests.conftest import make_tokenizer, people_rows, tiny_overrides, write_jsonl


def per_token_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE,
                                             reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_example_in_a_packed_row_has_the_loss_it_has_alone(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn, dtype=torch.float32).eval()
    rows = [tokenize_example(tok, r["messages"], LossOn.all, 128) for r in people_rows(4)]
    for r in rows:
        r.pop("length")
    (packed,) = pack_rows(rows, sum(len(r["input_ids"]) for r in rows))
    batch = collate_packed([packed])
    with torch.no_grad():
        together = per_token_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                        use_cache=False).logits,
                                  batch["labels"])
        start = 0
        for r in sorted(rows, key=lambda r: -len(r["input_ids"])):  # pack_rows puts the longest first
            n = len(r["input_ids"])
            alone = per_token_loss(model(input_ids=torch.tensor([r["input_ids"]])).logits,
                                   torch.tensor([r["labels"]]))
            inside = together[start:start + n - 1]  # the n-1 predictions within the example
            assert torch.allclose(inside, alone, atol=1e-5), (attn, (inside - alone).abs().max())
            start += n


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

    data = (write_jsonl(tmp_path / "t.jsonl", people_rows(8, seed=3)), write_jsonl(tmp_path / "e.jsonl", people_rows(2)))
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
