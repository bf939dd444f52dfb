"""Talking to a trained run: generate, eval and chat on the tiny model's run."""
import io
import json
import subprocess
import sys

import torch

from qlora.chat import ChatSession
from qlora.cli import compose, main
from qlora.config import GenConfig
from qlora.inference import load_for_inference
from tests.conftest import tiny_overrides, write_jsonl


def test_generate_one_prompt_prints_the_answer(tiny_run, capsys):
    run, _ = tiny_run
    assert main(["generate", f"adapter={run.run_dir}", "prompt=What's up, doc?", "gen.max_new_tokens=4"]) == 0
    out = capsys.readouterr().out.strip()
    assert out and "\n" not in out


def test_generate_a_prompts_file_writes_one_answer_per_line(tiny_run, tmp_path):
    run, _ = tiny_run
    held_out = {"messages": [{"role": "user", "content": "Ana is 9."}, {"role": "assistant", "content": "9"}]}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Maria is 34."}]}, held_out])
    out = tmp_path / "gen"
    assert main(["generate", f"adapter={run.run_dir}", f"prompts={prompts}", f"output_dir={out}",
                 "gen.max_new_tokens=3"]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["answer"], str) for r in rows)
    assert rows[1]["messages"][0] == {"role": "system", "content": "Be brief."} and "reference" not in rows[1]
    # a held-out row is answered from its user turn, its own answer kept beside the model's
    assert rows[2]["messages"] == held_out["messages"][:1] and rows[2]["reference"] == "9"


def test_bad_prompts_file_names_the_line(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"question": "?"}])
    assert main(["generate", f"adapter={run.run_dir}", f"prompts={prompts}"]) == 2
    assert f"{prompts}:2: expected" in capsys.readouterr().err


def test_eval_reproduces_the_training_report(tiny_run, tiny_data, capsys):
    run, overrides = tiny_run
    held = tiny_data[1]
    # fp32 products, as the run's (tiny_overrides: train.bf16_base_products=false)
    assert main(["eval", f"adapter={run.run_dir}", f"data.path={held}", "train.max_length=128",
                 "gen.bf16_base_products=false"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["loss"] - run.report["eval_loss"]) < 1e-4, (result, run.report["eval_loss"])
    # without data.path: the run's own held-out data, at its max_length
    assert main(["eval", f"adapter={run.run_dir}", "gen.bf16_base_products=false"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {**result, "data": str(held)}
    assert f"eval: the run's held-out data, {held}" in captured.err


def test_eval_of_a_run_with_a_held_out_share_scores_that_share(tiny_model, tiny_data, tmp_path, capsys):
    from qlora.train import fit

    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model, tiny_data, out, **{"data.eval_path": "null", "data.eval_fraction": 0.25,
                                                             "train.max_steps": 2})
    run = fit(compose("train", overrides))
    capsys.readouterr()
    assert main(["eval", f"adapter={out}", "gen.bf16_base_products=false"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == run.report["eval_examples"] > 0
    assert abs(result["loss"] - run.report["eval_loss"]) < 1e-4, (result, run.report)


def test_chat_session_keeps_history_and_obeys_commands(tiny_run, tmp_path):
    run, _ = tiny_run
    loaded = load_for_inference(compose("train", [f"adapter={run.run_dir}"]))
    out = io.StringIO()
    s = ChatSession(loaded, GenConfig(max_new_tokens=3), out=out)
    assert s.handle("hello") and len(s.history) == 2 and s.history[0] == {"role": "user", "content": "hello"}
    s.handle("/set temperature=0.5 do_sample=true top_k=5")
    assert (s.gen.temperature, s.gen.do_sample, s.gen.top_k) == (0.5, True, 5)
    s.handle("/set temperature=hot")
    assert "expected a number" in out.getvalue() and s.gen.temperature == 0.5
    s.handle("/set top_k=9 temperature=0")  # refused whole: generate() would raise at the next answer
    assert "gen.temperature=0.0: must be > 0" in out.getvalue() and (s.gen.temperature, s.gen.top_k) == (0.5, 5)
    s.handle("/system Be brief.")
    assert s.system == "Be brief." and s.history == []
    s.handle("again")
    s.handle("/compare")
    assert "--- base model:" in out.getvalue() and "--- fine-tuned:" in out.getvalue()
    s.handle(f"/save {tmp_path / 't.json'}")
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["messages"][0] == {"role": "system", "content": "Be brief."} and len(saved["messages"]) == 3
    s.handle("/reset")
    assert s.history == []
    s.handle("/frobnicate")
    assert "unknown command /frobnicate; /help lists the commands" in out.getvalue()
    assert s.handle("/quit") is False


def test_chat_through_stdin(tiny_run):
    run, _ = tiny_run
    script = "hello\n/set bogus=1\n/help\n/reset\n/quit\nnever answered\n"
    done = subprocess.run([sys.executable, "-m", "qlora", "chat", f"adapter={run.run_dir}",
                           "gen.max_new_tokens=3"], input=script, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "you> hello" in out and "tokens/s]" in out
    assert "cannot set 'bogus=1'" in out and "/compare" in out and "(conversation cleared)" in out
    assert "never answered" not in out
    assert "Traceback" not in done.stderr


def test_gen_fast_dequant_generates_and_evaluates_as_bitsandbytes_does(tiny_run, tiny_data, capsys, monkeypatch):
    """gen.fast_dequant: generation and evaluation multiply by our kernel's weights (every 4-bit layer,
    each token), for bitsandbytes' own answer and loss; false puts bitsandbytes' matmul back."""
    import bitsandbytes

    from qlora import dequant

    run, _ = tiny_run
    calls, kernel_run = [], dequant._run
    monkeypatch.setattr(dequant, "_run", lambda *a: calls.append(1) or kernel_run(*a))
    dequant.use_for_inference(False)  # as before any load in this process
    original = bitsandbytes.matmul_4bit
    outputs = {}
    for on in ("false", "true"):
        args = [f"adapter={run.run_dir}", f"gen.fast_dequant={on}", "gen.bf16_base_products=false"]
        assert main(["generate", *args, "prompt=Maria is 34 and lives in Lisbon.", "gen.max_new_tokens=6"]) == 0
        assert main(["eval", *args, f"data.path={tiny_data[1]}", "train.max_length=128"]) == 0
        outputs[on] = capsys.readouterr().out
        assert (bitsandbytes.matmul_4bit is original) == (on == "false")
        assert bool(calls) == (on == "true")
    assert len(calls) >= 14 * 6  # 2 layers x 7 projections, for each of the 6 new tokens at least
    assert outputs["true"] == outputs["false"]
    dequant.use_for_inference(False)
    assert bitsandbytes.matmul_4bit is original


def test_api_answers_and_refuses_unknown_sampling_settings(tiny_run):
    import pytest

    from qlora import api
    from qlora.errors import UserError

    run, _ = tiny_run
    bot = api.load(adapter=str(run.run_dir))
    answers = bot.ask_many(["Who is Ada?", "Who is Bob?"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert isinstance(bot.ask("Who is Ada?", max_new_tokens=4, do_sample=True, temperature=0.5), str)
    with pytest.raises(UserError, match=r"ask\(temprature=...\): not a sampling setting; use do_sample"):
        bot.ask("Who is Ada?", temprature=0.5)
    with pytest.raises(UserError, match=r"ask\(temperature='hot'\): expected a number"):
        bot.ask("Who is Ada?", temperature="hot")
    with pytest.raises(UserError, match="gen.top_p=1.5: must be in"):
        bot.ask("Who is Ada?", do_sample=True, top_p=1.5)


def test_mean_loss_scores_trained_tokens_as_the_model_does_in_any_batching(tiny_model, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora import evaluate
    from qlora.data import IGNORE

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in [(12, 5), (30, 20), (7, 0), (19, 18)]:
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    # transformers' own loss, one row at a time, weighted by the tokens each row scores
    total = count = 0
    for r in rows:
        scored = sum(label != IGNORE for label in r["labels"][1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
        total, count = total + loss.item() * scored, count + scored
    assert abs(evaluate.mean_loss(model, rows, batch_size=4) - total / count) < 1e-5
    monkeypatch.setattr(evaluate, "LOGITS_BYTES", 1)  # one row a batch
    assert abs(evaluate.mean_loss(model, rows, batch_size=4) - total / count) < 1e-5


def test_gen_bf16_base_products_multiply_in_bf16_but_not_for_merge_and_export(tiny_run, tiny_data, capsys,
                                                                             monkeypatch):
    """gen.bf16_base_products=true: generation and evaluation multiply the 4-bit layers' bf16 weights,
    with a loss close to fp32's; the reference that merge and export check against stays fp32."""
    from qlora import dequant
    from qlora.inference import load_for_inference

    run, _ = tiny_run
    dtypes, kernel = [], dequant.dequantize_4bit
    monkeypatch.setattr(dequant, "dequantize_4bit", lambda A, s, dtype=torch.float32: dtypes.append(dtype)
                        or kernel(A, s, dtype))
    losses = {}
    for on in ("false", "true"):
        dtypes.clear()
        args = [f"adapter={run.run_dir}", f"gen.bf16_base_products={on}"]
        assert main(["generate", *args, "prompt=Maria is 34 and lives in Lisbon.", "gen.max_new_tokens=4"]) == 0
        assert main(["eval", *args, f"data.path={tiny_data[1]}", "train.max_length=128"]) == 0
        out = capsys.readouterr().out
        losses[on] = json.loads(out[out.index('{\n  "model"'):])["loss"]
        assert set(dtypes) == {torch.bfloat16 if on == "true" else torch.float32}
    assert losses["true"] != losses["false"] and abs(losses["true"] - losses["false"]) < 0.01 * losses["false"]
    dtypes.clear()
    loaded = load_for_inference(compose("train", [f"adapter={run.run_dir}", "gen.bf16_base_products=true"]),
                                exact=True)
    with torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert set(dtypes) == {torch.float32}


def test_a_run_whose_base_moved_is_refused_with_the_fix_and_runs_on_the_new_place(tiny_model, tiny_data, tmp_path,
                                                                                  capsys):
    """The run's config.yaml names the base it trained on. Once that folder is gone, generate says so and
    how to point at it; with model.name_or_path=NEW_PLACE, generate answers as before the move and merge
    reads the base's weights from the new place."""
    import shutil

    old = shutil.copytree(tiny_model, tmp_path / "base")
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(old, tiny_data, run, **{"train.max_steps": 2})]) == 0
    capsys.readouterr()
    ask = ["generate", f"adapter={run}", "prompt=Ana is 9.", "gen.max_new_tokens=6"]
    assert main(ask) == 0
    before = capsys.readouterr().out
    shutil.move(old, tmp_path / "moved")

    assert main(ask) == 2
    err = capsys.readouterr().err
    assert f"model.name_or_path={old}: no such folder or file" in err
    assert f"adapter={run} was trained on that base; if it has moved, give model.name_or_path=" in err

    moved = [f"model.name_or_path={tmp_path / 'moved'}"]
    assert main(ask + moved) == 0
    out, err = capsys.readouterr()
    assert out == before
    assert f"adapter={run} on model.name_or_path={tmp_path / 'moved'} (trained on {old})" in err
    assert main(["merge", f"adapter={run}", f"output_dir={tmp_path / 'merged'}", *moved]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_the_held_out_answers_are_kept_beside_their_references(tiny_model, tiny_data, tmp_path, capsys):
    """With eval.exact_match, the run writes each scored answer (after training, and the base's before)
    beside its prompt and reference in eval_answers.jsonl, and the report's exact match is their share;
    `qlora eval output_dir=DIR` writes the same answers to DIR/answers.jsonl."""
    from qlora.config import DataConfig
    from qlora.data import prompt_and_answer, read_examples

    run = tmp_path / "run"
    scored = {"eval.exact_match": "true", "eval.max_examples": 4, "eval.max_new_tokens": 4}
    assert main(["train", *tiny_overrides(tiny_model, tiny_data, run, **scored, **{"train.max_steps": 2})]) == 0
    assert f"the held-out answers beside their references, before and after: {run / 'eval_answers.jsonl'}" \
        in capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "eval_answers.jsonl").read_text().splitlines()]
    report = json.loads((run / "report.json").read_text())
    held = read_examples(str(tiny_data[1]), DataConfig())[:4]
    assert [(r["prompt"], r["reference"]) for r in rows] == [
        (prompt, reference.strip()) for prompt, reference in map(prompt_and_answer, held)]
    assert all(r["match"] == (r["answer"] == r["reference"]) for r in rows)
    assert all(r["match_before"] == (r["answer_before"] == r["reference"]) for r in rows)
    assert report["eval_exact_match"] == sum(r["match"] for r in rows) / 4
    assert report["eval_exact_match_before"] == sum(r["match_before"] for r in rows) / 4

    out = tmp_path / "eval"
    assert main(["eval", f"adapter={run}", f"output_dir={out}", "gen.bf16_base_products=false",
                 *[f"{k}={v}" for k, v in scored.items()]]) == 0
    again = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert again == [{k: r[k] for k in ("prompt", "reference", "answer", "match")} for r in rows]
    assert json.loads((out / "eval.json").read_text())["exact_match"] == report["eval_exact_match"]
