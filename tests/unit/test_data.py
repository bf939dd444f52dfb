"""Data: formats, row validation with file:line, and masking that trains exactly the assistant turns."""
import json

import pytest

from qlora.config import DataConfig, DataFormat, LossOn, OnBadRow
from qlora.data import IGNORE, DataStats, read_examples, to_messages, tokenize_example
from qlora.errors import UserError
from tests.conftest import make_tokenizer, write_jsonl

# Published chat formats, written as templates here: (name, template, end-of-turn token)
ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def trained_text(tok, row):
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 and 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 and 4?"},
    {"role": "assistant", "content": "8 of them"},
]


def test_chatml_masking_trains_every_assistant_turn_and_its_end_token():
    tok = make_tokenizer()
    row = tokenize_example(tok, CONVERSATION, LossOn.assistant, 512)
    assert trained_text(tok, row) == "5<|im_end|>8 of them<|im_end|>"


QWEN25 = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
          "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template,eos,extra", [
    (ZEPHYR, "</s>", ["</s>"]),  # TinyLlama-Chat
    (LLAMA3, "<|eot_id|>", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    (QWEN25, "<|im_end|>", []),
], ids=["zephyr", "llama3", "qwen2.5"])
def test_masking_trains_exactly_the_assistant_contents_and_end_of_turn(template, eos, extra):
    tok = make_tokenizer(chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.eos_token = eos
    if template is LLAMA3:
        tok.bos_token = "<|begin_of_text|>"
    row = tokenize_example(tok, CONVERSATION, LossOn.assistant, 512)
    assert trained_text(tok, row) == f"5{eos}8 of them{eos}"
    pieces = [tok.decode([t]) for t in row["input_ids"]]
    assert pieces.count(eos) == 5  # every turn ends in one end-of-turn token; 2 of them trained


def test_loss_on_all_trains_every_token_and_truncation_applies():
    tok = make_tokenizer()
    row = tokenize_example(tok, CONVERSATION, LossOn.all, 10)
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) == 10


def test_sharegpt_rows_become_chat_messages():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}]}
    assert to_messages(row, DataFormat.auto) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]


def test_alpaca_rows_become_chat_messages():
    msgs = to_messages({"instruction": "Add", "input": "2 and 3", "output": "5"}, DataFormat.auto)
    assert msgs == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]


BAD_ROWS = [
    ("{not json", "malformed JSON"),
    ('["a list"]', "a row must be a JSON object"),
    (json.dumps({"question": "hi"}), "unknown row format"),
    (json.dumps({"messages": []}), "non-empty list"),
    (json.dumps({"messages": [{"role": "user"}]}), "needs 'role' and 'content'"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]}),
     "empty content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "does not end with an assistant"),
    (json.dumps({"instruction": "x", "output": ""}), "'output' is empty"),
    (json.dumps({"conversations": [{"from": "robot", "value": "x"}]}), "unknown 'from' 'robot'"),
    (json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]}), "turn 1 needs 'from'"),
]


@pytest.mark.parametrize("line,words", BAD_ROWS, ids=[w for _, w in BAD_ROWS])
def test_bad_rows_fail_with_file_and_line(tmp_path, line, words):
    good = json.dumps({"instruction": "a", "output": "b"})
    path = write_jsonl(tmp_path / "d.jsonl", [good, line])
    with pytest.raises(UserError) as e:
        read_examples(str(path), DataConfig(path=str(path)))
    assert str(e.value).startswith(f"{path}:2: ") and words in str(e.value)


def test_drop_policy_counts_reasons_and_enforces_the_threshold(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"})
    path = write_jsonl(tmp_path / "d.jsonl", [good] * 9 + ["{oops"])
    stats = DataStats()
    ok = read_examples(str(path), DataConfig(path=str(path), on_bad_row=OnBadRow.drop, max_bad_fraction=0.2), stats)
    assert len(ok) == 9 and stats.dropped == {"malformed JSON": 1}
    with pytest.raises(UserError, match="more than data.max_bad_fraction"):
        read_examples(str(path), DataConfig(path=str(path), on_bad_row=OnBadRow.drop, max_bad_fraction=0.05))


def test_a_data_path_of_another_format_is_read_as_its_own_format_from_the_demo_config(tmp_path):
    from qlora.cli import compose

    path = write_jsonl(tmp_path / "alpaca.jsonl", [json.dumps({"instruction": "Add 2 and 3", "output": "5"})])
    cfg = compose("train", [f"data.path={path}"])  # the demo's data group, another file
    assert [e.messages[-1]["content"] for e in read_examples(str(path), cfg.data)] == ["5"]
    with pytest.raises(UserError) as e:  # a format named outright is held to
        read_examples(str(path), DataConfig(path=str(path), format=DataFormat.messages))
    assert "no 'messages' in a row with keys ['instruction', 'output']; data.format=auto detects" in str(e.value)
