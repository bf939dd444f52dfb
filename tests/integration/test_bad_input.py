"""The catalogue of bad input beyond configs and data rows (see unit/test_config.py and
unit/test_data.py): model paths, adapter folders, output folders, files of the other verbs.
Each gives its one-line error, a non-zero exit, no traceback, and writes nothing."""
import pytest

from qlora.cli import main
from tests.conftest import tiny_overrides, write_jsonl


@pytest.fixture(scope="module")
def ctx(tiny_run, tiny_model, tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    (d / "fake.gguf").write_bytes(b"GGUF" + bytes(64))
    (d / "adapter_no_weights").mkdir()
    (d / "adapter_no_weights" / "adapter_config.json").write_text("{}")
    (d / "adapter_pickle").mkdir()
    (d / "adapter_pickle" / "adapter_config.json").write_text("{}")
    (d / "adapter_pickle" / "adapter_model.bin").write_bytes(b"\x80\x04")
    (d / "a_file").write_text("x")
    write_jsonl(d / "blank.jsonl", [" "])
    write_jsonl(d / "bad_eval.jsonl", ['{"messages": [{"role": "user", "content": "hi"}, '
                                       '{"role": "assistant", "content": ""}]}'])
    run, _ = tiny_run
    return dict(d=d, run=run.run_dir, model=tiny_model, data=tiny_data)


def train(c, **extra):
    return ["train", *tiny_overrides(c["model"], c["data"], c["d"] / "out", **extra)]


CATALOGUE = [
    # (id, argv from ctx, exit code, words in the message)
    ("model folder missing", lambda c: train(c, **{"model.name_or_path": "/nonexistent/model"}), 2,
     "no such folder or file, and not a hub id"),
    ("not a model folder", lambda c: train(c, **{"model.name_or_path": c["d"] / "empty"}), 2,
     "not a model folder (no config.json)"),
    ("GGUF file missing", lambda c: train(c, **{"model.name_or_path": "/nonexistent/m.gguf"}), 2,
     "no such GGUF file"),
    ("GGUF transformers cannot read", lambda c: train(c, **{"model.name_or_path": c["d"] / "fake.gguf"}), 2,
     "transformers cannot load this GGUF file"),
    ("data file empty", lambda c: train(c, **{"data.path": c["d"] / "blank.jsonl"}), 2, "no usable rows"),
    ("data folder without data files", lambda c: train(c, **{"data.path": c["d"] / "empty"}), 2,
     "the folder holds no .jsonl, .json, .csv, .parquet files"),
    ("bad row in eval data", lambda c: train(c, **{"data.eval_path": c["d"] / "bad_eval.jsonl"}), 2,
     "bad_eval.jsonl:1: message 1 (assistant) has empty content"),
    ("output folder under a file", lambda c: train(c, output_dir=c["d"] / "a_file" / "run"), 2,
     "cannot write there"),
    ("output folder exists", lambda c: train(c, output_dir=c["run"]), 2, "resume=auto"),
    ("resume without a checkpoint in another folder", lambda c: train(c, output_dir=c["d"], resume="auto"), 2,
     "no whole checkpoint in"),
    ("resume without output_dir", lambda c: [a for a in train(c) if not a.startswith("output_dir=")]
     + ["resume=auto"], 2, "resume=auto needs the run to continue: add output_dir=RUN_DIR"),
    ("checkpointing lever with checkpointing off on CPU", lambda c: train(c, **{"train.checkpoint_layers": 2}), 2,
     "train.checkpoint_layers=2 shapes gradient checkpointing, which train.gradient_checkpointing=auto leaves off "
     "on cpu: set train.gradient_checkpointing=true"),
    ("offloading checkpoints on CPU", lambda c: train(c, **{"train.gradient_checkpointing": "true",
                                                           "train.offload_checkpoints": "true"}), 2,
     "train.offload_checkpoints=true moves checkpointed activations off a GPU"),
    ("Liger kernels on CPU", lambda c: train(c, **{"train.liger_kernels": "true"}), 2,
     "train.liger_kernels=true: Liger's kernels are Triton kernels for GPUs"),
    ("a LoRA target the model does not have", lambda c: train(c, **{"lora.target_modules": "[q_proj,qkv_proj]"}), 2,
     "lora.target_modules=['q_proj', 'qkv_proj']: llama has no module qkv_proj; its linear layers are down_proj, "
     "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ("LoRA on the LM head", lambda c: train(c, **{"lora.target_modules": "[q_proj,lm_head]"}), 2,
     "the LM head cannot take an adapter"),
    ("a schedule argument the schedule does not take", lambda c: train(c, **{
        "train.lr_scheduler_type": "cosine_with_min_lr", "train.lr_scheduler_kwargs.min_lr_rate": 0.1,
        "train.lr_scheduler_kwargs.min_lr_ratio": 0.1}), 2,
     "train.lr_scheduler_type=cosine_with_min_lr refuses them: get_cosine_with_min_lr_schedule_with_warmup() got "
     "an unexpected keyword argument 'min_lr_ratio'"),
    ("adapter folder missing", lambda c: ["generate", f"adapter={c['d'] / 'nope'}", "prompt=hi"], 2,
     "no adapter_config.json"),
    ("adapter without weights", lambda c: ["chat", f"adapter={c['d'] / 'adapter_no_weights'}"], 2,
     "no adapter_model.safetensors"),
    ("adapter as a pickle", lambda c: ["merge", f"adapter={c['d'] / 'adapter_pickle'}",
                                       f"output_dir={c['d'] / 'm'}"], 2, "is a pickle, which can run code"),
    ("generate without a prompt", lambda c: ["generate", f"adapter={c['run']}"], 2,
     "give one of prompt="),
    ("sampling at temperature 0", lambda c: ["generate", f"adapter={c['run']}", "prompt=hi", "gen.do_sample=true",
                                             "gen.temperature=0"], 2, "gen.temperature=0.0: must be > 0"),
    ("prompts file missing", lambda c: ["generate", f"adapter={c['run']}", "prompts=/nonexistent.jsonl"], 2,
     "gen.prompts=/nonexistent.jsonl: no such file"),
    ("eval in batches of 0", lambda c: ["eval", f"adapter={c['run']}", f"data.path={c['data'][1]}",
                                        "eval.batch_size=0"], 2, "eval.batch_size=0: must be > 0"),
    ("eval data missing", lambda c: ["eval", f"adapter={c['run']}", "data.path=/nonexistent.jsonl"], 2,
     "no such file"),
    ("merge without output_dir", lambda c: ["merge", f"adapter={c['run']}"], 2, "output_dir=DIR"),
    ("merge with an unreadable shard size", lambda c: ["merge", f"adapter={c['run']}", "merge.max_shard_size=2G",
                                                       f"output_dir={c['d'] / 'm'}"], 2,
     "merge.max_shard_size=2G: write a size like 500MB or 2GB"),
    ("merge without adapter", lambda c: ["merge", f"output_dir={c['d'] / 'm'}"], 2, "adapter=RUN_DIR"),
    ("export of a non-model folder", lambda c: ["export", f"model.name_or_path={c['d'] / 'empty'}",
                                                "export.format=gguf", f"output_dir={c['d'] / 'g'}"], 2,
     "model.name_or_path=MERGED_FOLDER"),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(case, ctx, capsys):
    _, argv, code, words = case
    before = sorted(p.name for p in ctx["d"].iterdir())
    assert main([str(a) for a in argv(ctx)]) == code
    err = capsys.readouterr().err
    assert "qlora: error:" in err and words in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in ctx["d"].iterdir()) == before, "nothing written"
