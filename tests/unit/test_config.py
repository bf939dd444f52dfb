"""Configs are code: every recipe composes and validates; bad input fails fast with the key named."""
import subprocess
import sys

import pytest

from qlora.cli import compose, main
from qlora.config import RECIPES_DIR
from qlora.validation import validate_train

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_there_are_recipes_for_cpu_t4_and_big_gpus():
    assert {"smollm2_demo", "tinyllama_demo_t4", "llama3.1_8b_demo", "mistral_7b_demo",
            "qwen2.5_7b_demo"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_and_validates(name):
    cfg = compose("train", [f"recipe={name}"])
    assert cfg.recipe == name
    assert validate_train(cfg) == []
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    assert f"qlora train recipe={name}" in text, "a recipe opens with the command that runs it"
    assert "hardware:" in text


def test_overrides_win_over_the_recipe():
    cfg = compose("train", ["recipe=smollm2_demo", "lora.r=32", "train.max_steps=100"])
    assert cfg.lora.r == 32 and cfg.train.max_steps == 100
    assert cfg.train.learning_rate == 1e-3  # from the recipe


def test_a_recipe_of_your_own_is_a_yaml_file_of_keys(tmp_path, monkeypatch):
    """recipe=FILE: the file's keys (no `# @package` line needed), its config-group choices, the command
    line over both; the run goes to outputs/<file name>/ and the config records the file's full path."""
    from qlora.run_dir import default_output_dir

    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "mine.yaml").write_text(
        "# our extraction task\ndefaults:\n  - override /model: tinyllama_1.1b_chat\n\n"
        "lora:\n  r: 4\ntrain:\n  max_steps: 30\n  learning_rate: 5e-5\n")
    monkeypatch.chdir(tmp_path)
    cfg = compose("train", ["recipe=team/mine.yaml", "train.max_steps=7"])
    assert (cfg.lora.r, cfg.train.max_steps, cfg.train.learning_rate) == (4, 7, 5e-5)
    assert cfg.model.name_or_path == compose("train", ["model=tinyllama_1.1b_chat"]).model.name_or_path
    assert cfg.recipe == str(tmp_path / "team" / "mine.yaml")
    assert default_output_dir(cfg).startswith("outputs/mine/")
    assert validate_train(cfg) == []


def test_a_built_in_recipe_given_as_its_file_is_the_same_recipe():
    by_file = compose("train", [f"recipe={RECIPES_DIR / 'tinyllama_demo_t4.yaml'}"])
    by_name = compose("train", ["recipe=tinyllama_demo_t4"])
    assert by_file.recipe != by_name.recipe
    by_file.recipe = by_name.recipe
    assert by_file == by_name


@pytest.mark.parametrize("text, words", [
    (None, "recipe=nope/mine.yaml: no such file"),
    ("train:\n  max_steps: [1\n", "mine.yaml:3: not valid YAML"),
    ("- lora.r=8\n", "mine.yaml: holds a list, not keys"),
    ("train:\n  max_step: 10\n", "mine.yaml: train.max_step: no such key; did you mean train.max_steps?"),
    ("lora:\n  r: many\n", "mine.yaml: lora.r: Value 'many' of type 'str' could not be converted to Integer"),
    ("defaults:\n  - override /model: nope\n", "mine.yaml: model=nope: no such model config"),
])
def test_a_bad_recipe_file_is_refused_with_the_file_and_the_key(tmp_path, capsys, text, words):
    recipe = tmp_path / "mine.yaml"
    if text is None:
        recipe = "nope/mine.yaml"
    else:
        recipe.write_text(text)
    assert main(["train", f"recipe={recipe}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora: error: recipe=") and words in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_schedule_arguments_are_the_users_keys_set_one_by_one_or_as_a_dict():
    cfg = compose("train", ["train.lr_scheduler_kwargs.min_lr_rate=0.1", "train.lr_scheduler_kwargs.num_cycles=0.5"])
    assert cfg.train.lr_scheduler_kwargs == {"min_lr_rate": 0.1, "num_cycles": 0.5}
    cfg = compose("train", ["train.lr_scheduler_kwargs={min_lr:1e-5}"])
    assert cfg.train.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert compose("train", []).train.lr_scheduler_kwargs == {}


def test_the_demo_held_out_file_goes_only_with_the_demo_data(tmp_path):
    demo = compose("train", [])
    assert demo.data.eval_path.endswith("people_eval.jsonl")
    mine = str(tmp_path / "mine.jsonl")
    assert compose("train", [f"data.path={mine}"]).data.eval_path is None
    assert compose("train", [f"data.sources=[{{path:{mine}}}]"]).data.eval_path is None
    assert compose("train", [f"data.path={mine}", f"data.eval_path={mine}"]).data.eval_path == mine
    assert compose("train", [f"data.path={demo.data.path}"]).data.eval_path == demo.data.eval_path
    share = compose("train", ["data.eval_fraction=0.2"]).data  # a share asked for on the demo's data
    assert share.eval_path is None and share.eval_fraction == 0.2


def test_free_text_is_taken_as_typed():
    cfg = compose("train", ["prompt=What's the capital of France, really?", "system=Be brief, please."])
    assert cfg.gen.prompt == "What's the capital of France, really?"
    assert cfg.gen.system == "Be brief, please."


def test_help_and_config_errors_do_not_import_torch():
    code = ("import sys; from qlora.cli import main; "
            "assert main(['--help']) == 0; assert main(['train', '--help']) == 0; "
            "assert main(['train', 'lora.r=abc']) == 2; assert main(['recipes']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "lora.r" in done.stderr and "bnb_4bit_compute_dtype" in done.stdout


def test_train_help_shows_types_defaults_and_docstrings(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "r: int = 16  # LoRA rank." in out
    assert "bnb_4bit_quant_type: nf4|fp4 = 'nf4'" in out


def test_recipes_lists_descriptions(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "smollm2_demo" in out and "JSON" in out


def test_bitsandbytes_cpu_kernel_warning_does_not_reach_the_user(caplog):
    """On CPUs with bf16 units bitsandbytes warns at import that it cannot fetch a Hub kernel that
    qlora does not use; importing qlora (the command line, the Python API) keeps it from the user."""
    import importlib
    import logging

    importlib.import_module("qlora.api")  # what a notebook imports

    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    assert "gemm_4bit_forward" not in caplog.text


BAD = [
    # (overrides, words the one-line message must contain)
    (["lora.rr=3"], "lora.rr: no such key; did you mean lora.r? see `qlora VERB --help`"),
    (["lora.zzz=3"], "lora.zzz: no such key; see `qlora VERB --help`"),
    (["train.max_step=3"], "train.max_step: no such key; did you mean train.max_steps? see `qlora VERB --help`"),
    (["data.columns.promt=question"], "data.columns.promt: no such key; did you mean data.columns.prompt?"),
    (["lora.r=abc"], "lora.r:"),
    (["lora.r=0"], "lora.r=0: must be > 0"),
    (["lora.lora_dropout=1.5"], "lora.lora_dropout=1.5"),
    (["quant.bnb_4bit_quant_type=nf5"], "expected one of [nf4, fp4]"),
    (["quant.bnb_4bit_compute_dtype=float8"], "quant.bnb_4bit_compute_dtype"),
    (["recipe=nope"], "recipe=nope: no such recipe"),
    (["model=nope"], "model=nope: no such model config"),
    (["train.max_steps=[1,2"], "could not parse an override"),
    (["+train.foo=1"], "drop the '+'"),
    (["train.max_steps"], "is not key=value"),
    (["train.lr_scheduler_type=zigzag"], "train.lr_scheduler_type=zigzag"),
    (["train.report_to=[tensorbored]"], "unknown tracker 'tensorbored'"),
    (["train.lr_scheduler_type=cosine_with_min_lr"], "decays to a floor: give one of "
     "train.lr_scheduler_kwargs.min_lr_rate (a share of the peak, such as 0.1) or .min_lr"),
    (["train.lr_scheduler_type=warmup_stable_decay"], "give the steps of its decay, "
     "train.lr_scheduler_kwargs.num_decay_steps"),
    (["train.lr_scheduler_type=reduce_lr_on_plateau"], "follows the held-out loss: set train.eval_steps"),
    (["train.early_stopping_patience=3"], "train.early_stopping_patience=3 counts evaluations: set train.eval_steps"),
    (["train.early_stopping_patience=0"], "train.early_stopping_patience=0: must be >= 1"),
    (["train.eval_steps=10", "train.save_steps=10", "train.early_stopping_threshold=-1"],
     "train.early_stopping_threshold=-1.0: must be >= 0"),
    (["eval.batch_size=0"], "eval.batch_size=0: must be > 0"),
    (["eval.max_examples=0"], "eval.max_examples=0: must be > 0, or null for every example"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1: must be >= 0"),
    (["train.neftune_noise_alpha=-1"], "train.neftune_noise_alpha=-1.0: must be >= 0"),
    (["lora.init=loftq", "quant.load_in_4bit=false"], "lora.init=loftq starts LoRA at the 4-bit weights' error"),
    (["lora.init=loftq", "lora.use_dora=true"], "lora.init=loftq with lora.use_dora=true"),
    (["train.seed=-5"], "train.seed=-5: must be in [0, 2**32)"),
    (["train.optim=sgdx"], "train.optim=sgdx: not an optimizer transformers knows; use auto or one of adafactor,"),
    (["train.optim=galore_adamw"], "train.optim=galore_adamw: GaLore and APOLLO train full weight matrices"),
    (["train.optim=adamw_torch_npu_fused"], "train.optim=adamw_torch_npu_fused needs the Python module torch_npu"),
    (["data.path=/nonexistent/train.jsonl"], "data.path=/nonexistent/train.jsonl: no such file"),
    (["data.eval_path=null", "eval.exact_match=true"], "needs held-out data"),
    ([f"data.eval_path={__file__}", "data.eval_fraction=0.1"], f"data.eval_fraction=0.1 holds out a share of the "
     f"training rows, and data.eval_path={__file__} is held-out data too: give one (data.eval_path=null"),
    (["lora.target_modules=q_proj"], "expects a list"),
    (["data.sources=[{path:/nonexistent/a.jsonl,weight:0}]"], "data.sources[0].weight=0.0: must be > 0"),
    (["data.sources=[{path:/nonexistent/a.jsonl}]"], "data.sources[0].path=/nonexistent/a.jsonl: no such file"),
    (["data.path=/nonexistent/*.csv"], "the pattern matches no file"),
    (["data.format=csv"], "data.format"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio=1.5"),
    (["resume=/nonexistent/checkpoint-3"], "no such checkpoint folder"),
    (["dist=fsdp_qlora"], "quant.bnb_4bit_quant_storage=bfloat16"),
    (["recipe=llama3.1_70b_fsdp_2x24gb", "train.optim=paged_adamw_8bit"], "do not shard under FSDP"),
    (["train.checkpoint_layers=0"], "train.checkpoint_layers=0: must be >= 1"),
    (["train.gradient_checkpointing=false", "train.checkpoint_attention=true"],
     "train.checkpoint_attention=true shapes gradient checkpointing, which train.gradient_checkpointing=false"),
    (["train.fused_lora=false", "train.bf16_base_products=true"],
     "train.bf16_base_products=true: the bf16 products are made within train.fused_lora's layers"),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_exits_2_with_the_key_and_writes_nothing(overrides, words, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", f"output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora: error:") and words in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_the_scheduler_and_optimizer_names_checked_are_transformers_own():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from qlora.validation import FULL_WEIGHT_OPTIMIZERS, OPTIMIZER_MODULES, OPTIMIZERS, SCHEDULERS

    assert SCHEDULERS == {s.value for s in SchedulerType}
    assert OPTIMIZERS | set(OPTIMIZER_MODULES) | FULL_WEIGHT_OPTIMIZERS == {o.value for o in OptimizerNames}


def test_fsdp_qlora_recipe_asks_the_trainer_for_peft_aware_full_sharding():
    from qlora.trainer_args import fsdp_args

    cfg = compose("train", ["recipe=llama3.1_70b_fsdp_2x24gb"])
    args = fsdp_args(cfg)
    assert args["fsdp"] == "full_shard auto_wrap"
    assert args["fsdp_config"]["use_orig_params"] is False and args["fsdp_config"]["cpu_ram_efficient_loading"]
    assert cfg.quant.bnb_4bit_quant_storage.value == cfg.quant.bnb_4bit_compute_dtype.value == "bfloat16"


def test_auto_optimizer_is_paged_8bit_on_one_gpu_and_fused_adamw_on_cpu_and_under_fsdp():
    from qlora.validation import pick_optimizer

    assert pick_optimizer("auto", "cuda") == "paged_adamw_8bit"
    assert pick_optimizer("auto", "cuda", fsdp=True) == pick_optimizer("auto", "cpu") == "adamw_torch_fused"
    assert pick_optimizer("adamw_8bit", "cuda", fsdp=False) == "adamw_8bit"


def test_unknown_verb_exits_2(capsys):
    assert main(["trian"]) == 2
    assert "unknown verb 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["true", "false", "True", "auto"])
def test_three_way_switches_take_true_and_false_from_the_command_line(value):
    from qlora.config import Switch

    cfg = compose("train", [f"train.gradient_checkpointing={value}"])
    assert cfg.train.gradient_checkpointing is Switch(value.lower())


def test_merge_and_generation_settings_are_checked_before_a_model_loads():
    from qlora.validation import validate_gen, validate_merge

    cfg = compose("train", ["merge.max_shard_size=2G", "gen.top_p=0", "gen.top_k=-1", "gen.repetition_penalty=0"])
    assert validate_merge(cfg) == ["merge.max_shard_size=2G: write a size like 500MB or 2GB"]
    assert [p.split(":")[0] for p in validate_gen(cfg.gen)] == ["gen.top_p=0.0", "gen.top_k=-1",
                                                                "gen.repetition_penalty=0.0"]
    assert validate_merge(compose("train", [])) == validate_gen(compose("train", []).gen) == []


def test_peft_wrapping_and_saving_a_model_warns_nothing_the_user_could_act_on(tmp_path):
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora import quiet_libraries  # run by importing qlora (the command line, the Python API)

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(40)  # a chat template's added tokens (models.resize_for_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, each time: then what qlora sets when imported
        quiet_libraries()
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear",
                                                      modules_to_save=["embed_tokens", "lm_head"]))
        peft_model.save_pretrained(tmp_path / "adapter")
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))] == []
