"""Sources (JSONL, JSON, CSV, Parquet, folders, globs, Hugging Face datasets, weighted mixtures),
the plain-text formats, and a catalogue of broken files, each refused at file:line."""
import csv
import json

import pytest

from qlora.config import DataConfig, DataFormat, LossOn, SourceConfig
from qlora.data import IGNORE, DataStats, read_examples, split_examples, tokenize_plain
from qlora.errors import UserError
from tests.conftest import make_tokenizer, write_jsonl

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5"}
PC = {"prompt": "2 + 3 =", "completion": " 5"}


def write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read(path, **kw):
    return read_examples(str(path), DataConfig(path=str(path), **kw))


def test_every_file_type_gives_the_same_examples(tmp_path):
    rows = [CHAT, ALPACA, PC]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    parquet = write_parquet(tmp_path / "a.parquet", [PC, PC])
    csvf = write_csv(tmp_path / "a.csv", ["prompt", "completion"], [[PC["prompt"], PC["completion"]]] * 2)
    want = read(jsonl)
    assert [e.messages for e in read(tmp_path / "a.json")] == [e.messages for e in want]
    assert want[2].prompt == "2 + 3 =" and want[2].completion == " 5" and want[2].messages == []
    for f in (parquet, csvf):
        got = read(f)
        assert [(e.prompt, e.completion) for e in got] == [(PC["prompt"], PC["completion"])] * 2
    assert read(parquet)[1].where == f"{parquet}:row 2" and read(csvf)[1].where == f"{csvf}:3"


def test_json_rows_are_reported_at_the_line_they_start(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c",\n   "completion": "d"}\n]\n')
    assert [e.where for e in read(f)] == [f"{f}:2", f"{f}:4"]
    g = tmp_path / "e.json"
    g.write_text(json.dumps({"data": [PC, PC]}))
    assert len(read(g)) == 2


def test_csv_cells_holding_json_messages_are_chat_rows(tmp_path):
    f = write_csv(tmp_path / "c.csv", ["messages"], [[json.dumps(CHAT["messages"])]])
    assert read(f)[0].messages == CHAT["messages"]


def test_folders_and_globs_read_every_data_file_in_order(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "b.jsonl", [PC])
    write_jsonl(d / "sub" / "a.jsonl", [PC, PC])
    (d / "notes.txt").write_text("ignored")
    assert len(read(d)) == 3
    assert len(read(f"{d}/*.jsonl")) == 1 and len(read(f"{d}/**/*.jsonl")) == 3


def test_column_names_are_configurable(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [{"question": "2 + 3 =", "answer": " 5"}])
    cols = dict(DataConfig().columns, prompt="question", completion="answer")
    ex = read(f, columns=cols)[0]
    assert (ex.prompt, ex.completion) == ("2 + 3 =", " 5")


def test_mixture_weights_repeat_and_subsample_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [dict(PC, prompt=f"a{i}") for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(PC, prompt=f"b{i}") for i in range(10)])
    cfg = DataConfig(sources=[SourceConfig(path=str(a), weight=2.0), SourceConfig(path=str(b), weight=0.3)],
                     eval_path=None)
    train, held, stats = split_examples(cfg, seed=0)
    names = [e.prompt for e in train]
    assert sum(n.startswith("a") for n in names) == 20 and sum(n.startswith("b") for n in names) == 3
    assert len(set(n for n in names if n.startswith("b"))) == 3 and stats.rows == 20
    again = [e.prompt for e in split_examples(cfg, seed=0)[0]]
    assert again == names  # seeded


def test_hugging_face_dataset_rows_are_read_by_name(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, subset, split):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([ALPACA, ALPACA])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = read_examples("tatsu-lab/alpaca", DataConfig(subset="main", split="train[:2]"))
    assert calls == [("tatsu-lab/alpaca", "main", "train[:2]")]
    assert len(got) == 2 and got[1].where == "tatsu-lab/alpaca[train[:2]]:row 2"


def test_an_unreachable_hugging_face_dataset_is_a_one_line_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="not a local file, folder or glob, and loading it as a Hugging Face"):
        read_examples("nobody/nothing", DataConfig())


def test_prompt_completion_trains_the_completion_and_eos():
    tok = make_tokenizer()
    row = tokenize_plain(tok, "What is the capital of France?", " Paris.", LossOn.completion, 64)
    trained = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    assert trained == " Paris.<|im_end|>" and row["input_ids"][-1] == tok.eos_token_id


def test_text_trains_every_token_and_eos():
    tok = make_tokenizer()
    row = tokenize_plain(tok, "", "Maria is 34 years old.", LossOn.assistant, 64)
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tok.eos_token_id


def test_loss_on_completion_trains_only_the_last_assistant_turn():
    from qlora.data import tokenize_example
    from tests.unit.test_data import CONVERSATION, trained_text

    tok = make_tokenizer()
    assert trained_text(tok, tokenize_example(tok, CONVERSATION, LossOn.completion, 512)) == "8 of them<|im_end|>"


# ------------------------------------------------------------------ broken files, each refused where it breaks

def _jsonl(*rows):
    return lambda d: write_jsonl(d / "bad.jsonl", [PC, *rows])


def _raw(name, text):
    def make(d):
        (d / name).write_text(text)
        return d / name
    return make


CATALOGUE = [
    # (name, makes the file, where (relative), words of the message, data.format)
    ("malformed jsonl line", _jsonl('{"prompt": "a", "completion": }'), "bad.jsonl:2", "malformed JSON", "auto"),
    ("row is a list", _jsonl('["a", "b"]'), "bad.jsonl:2", "must be a JSON object", "auto"),
    ("unknown keys", _jsonl({"question": "x"}), "bad.jsonl:2", "unknown row format", "auto"),
    ("empty messages", _jsonl({"messages": []}), "bad.jsonl:2", "non-empty list", "auto"),
    ("message without content", _jsonl({"messages": [{"role": "user"}]}), "bad.jsonl:2", "needs 'role' and 'content'", "auto"),
    ("unknown role", _jsonl({"messages": [{"role": "bot", "content": "x"}]}), "bad.jsonl:2", "unknown role 'bot'", "auto"),
    ("empty content", _jsonl({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}),
     "bad.jsonl:2", "empty content", "auto"),
    ("ends with the user", _jsonl({"messages": [{"role": "user", "content": "x"}]}), "bad.jsonl:2",
     "does not end with an assistant", "auto"),
    ("no user turn", _jsonl({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "bad.jsonl:2", "has no user message", "auto"),
    ("alpaca without output", _jsonl({"instruction": "x", "output": "  "}), "bad.jsonl:2", "'output' is empty", "auto"),
    ("sharegpt unknown speaker", _jsonl({"conversations": [{"from": "robot", "value": "x"}]}), "bad.jsonl:2",
     "unknown 'from' 'robot'", "auto"),
    ("completion not text", _jsonl({"prompt": "x", "completion": 5}), "bad.jsonl:2", "'completion' must be a string", "auto"),
    ("empty text", _jsonl({"text": " "}), "bad.jsonl:2", "'text' is empty", "auto"),
    ("forced format does not fit", _jsonl(CHAT), "bad.jsonl:1", "'instruction' must be a string (missing)", "alpaca"),
    ("json trailing comma", _raw("bad.json", '[\n {"prompt": "a", "completion": "b"},\n]\n'), "bad.json:3",
     "malformed JSON", "auto"),
    ("json item bad", _raw("bad.json", '[\n {"prompt": "a", "completion": "b"},\n {"prompt": "a"}\n]\n'), "bad.json:3",
     "unknown row format", "auto"),
    ("json not a list", _raw("bad.json", '{"prompt": "a"}'), "bad.json:1", "must hold a list of rows", "auto"),
    ("csv extra cell", _raw("bad.csv", "prompt,completion\na,b\nc,d,e\n"), "bad.csv:3", "more cells than the 2 columns",
     "auto"),
    ("csv empty completion", _raw("bad.csv", 'prompt,completion\na,b\n"multi\nline",\n'), "bad.csv:3",
     "'completion' is empty", "auto"),
    ("parquet missing value", lambda d: write_parquet(d / "bad.parquet", [PC, {"prompt": "x", "completion": None}]),
     "bad.parquet:row 2", "'completion' must be a string", "auto"),
    ("not parquet", _raw("bad.parquet", "this is not parquet"), "bad.parquet:row 1", "not a readable Parquet file", "auto"),
]


@pytest.mark.parametrize("make,where,words,fmt", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_broken_file_is_refused_at_file_and_line(tmp_path, make, where, words, fmt):
    path = make(tmp_path)
    with pytest.raises(UserError) as e:
        read_examples(str(path), DataConfig(path=str(path), format=DataFormat(fmt)))
    message = str(e.value)
    assert message.startswith(f"{tmp_path}/{where}: ") and words in message, message


def test_a_folder_without_data_files_is_refused_before_loading(tmp_path):
    from qlora.sources import check_path

    (tmp_path / "notes.txt").write_text("x")
    assert "holds no .jsonl, .json, .csv, .parquet files" in check_path("data.path", str(tmp_path))


def test_dropped_rows_are_counted_per_file_by_reason(tmp_path):
    from qlora.config import OnBadRow

    f = write_jsonl(tmp_path / "d.jsonl", [PC] * 98 + [{"prompt": "x"}, "{oops"])
    stats = DataStats()
    ok = read_examples(str(f), DataConfig(on_bad_row=OnBadRow.drop, max_bad_fraction=0.05), stats)
    assert len(ok) == 98 and sum(stats.dropped.values()) == 2 and stats.dropped["malformed JSON"] == 1


def test_held_out_rows_of_a_mixture_are_never_trained_on(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [dict(PC, prompt=f"a{i}") for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(PC, prompt=f"b{i}") for i in range(20)])
    cfg = DataConfig(sources=[SourceConfig(path=str(a), weight=2.0), SourceConfig(path=str(b), weight=0.5)],
                     eval_path=None, eval_fraction=0.25)
    train, held, _ = split_examples(cfg, seed=0)
    held_names = {e.prompt for e in held}
    assert len(held) == 10 and not held_names & {e.prompt for e in train}
    assert sum(e.prompt.startswith("a") for e in train) == 30 and sum(e.prompt.startswith("b") for e in train) == 8


def test_the_resume_fingerprint_reads_folders_globs_mixtures_and_hub_names(tmp_path):
    from qlora.checkpoints import fingerprint
    from qlora.cli import compose

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "one"}\n')
    (folder / "b.jsonl").write_text('{"text": "two"}\n')

    def digest(*overrides):
        fp = fingerprint(compose("train", ["data.eval_path=null", *overrides]))
        return fp["data.path (sha256)"], fp.get("data.sources (sha256, weight, format)")

    by_folder, by_glob = digest(f"data.path={folder}"), digest(f"data.path={folder}/*.jsonl")
    assert by_folder == by_glob and by_folder[0]
    (folder / "b.jsonl").write_text('{"text": "two, edited"}\n')
    assert digest(f"data.path={folder}") != by_folder, "a changed file changes the fingerprint"
    hub = digest("data.path=org/some-dataset")  # its rows are not read: its name, subset and split
    assert hub != digest("data.path=org/some-dataset", "data.split=test") and hub[0]
    mixture = digest(f"data.sources=[{{path:{folder}/a.jsonl,weight:2}},{{path:{folder}/b.jsonl}}]")
    assert mixture[0] is None and [w for _, w, _ in mixture[1]] == [2.0, 1.0]
    assert json.loads(json.dumps(mixture[1])) == mixture[1], "compares equal once saved in fingerprint.json"
