"""`qlora VERB [key=value ...]`: compose the config with Hydra, validate it, run the verb.

Hydra's compose API (not @hydra.main) keeps exit codes ours and writes no outputs/.hydra folders.
Heavy libraries (torch, transformers, bitsandbytes) are imported by the verbs, never here, so
`--help` and config errors answer in about a second.
"""
from __future__ import annotations

import difflib
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from qlora.errors import UserError, WorkError
from qlora.recipe_files import list_recipes, recipe_file, recipe_overrides, recipes_found

# verb: (one-line description, primary config in conf/, config groups shown by --help)
VERBS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "train": ("fine-tune a base model with LoRA on 4-bit weights; writes a run directory", "train",
              ("model", "quant", "lora", "data", "train", "eval", "dist")),
    "chat": ("interactive chat in the terminal with a run (adapter=RUN) or a model", "train",
             ("model", "quant", "gen")),
    "generate": ("answer one prompt, or a JSONL file of prompts", "train", ("model", "quant", "gen")),
    "eval": ("loss and greedy exact match of a run or model on data.path (a run's own held-out data by default)",
             "train",
             ("model", "quant", "data", "eval")),
    "merge": ("merge a run's adapter into its base; writes a standalone model folder", "train",
              ("merge",)),
    "export": ("write a run (or a merged folder) for another runtime: safetensors, gguf, ollama, nf4",
               "train", ("merge", "export")),
    "data check": ("render, validate and audit a dataset for a config, without training", "train",
                   ("model", "data", "train")),
    "quant report": ("quantization error of each scheme on a model's linear layers (table + plot)", "train",
                     ("model",)),
    "quant ptq": ("post-training INT8 (dynamic and static) of a merged model: size, speed, quality",
                  "train", ("model", "data")),
    "plan": ("estimate peak training memory on a GPU (gpu=T4|A10G|L4|A100-40|A100-80|H100) or this machine, "
             "and what fits", "train", ("model", "quant", "lora", "data", "train")),
    "recipes": ("list the recipes with their one-line descriptions", "", ()),
}
GROUPS = {"model", "quant", "lora", "data", "train", "eval", "gen", "merge", "export", "dist"}
# Values typed as free text: kept out of Hydra's override grammar, which rejects quotes and commas.
FREE_TEXT = {"prompt": "gen.prompt", "system": "gen.system", "gen.prompt": "gen.prompt",
             "gen.system": "gen.system"}
# top-level shorthands of the contract
ALIASES = {"prompts": "gen.prompts"}

USAGE = """usage: qlora VERB [key=value ...]      (qlora VERB --help for its keys)

verbs:
{verbs}

Examples:
  qlora train                                   # the built-in demo (SmolLM2-135M, CPU or GPU)
  qlora train recipe=tinyllama_demo_t4 lora.r=32 train.max_steps=100
  qlora train --multirun lora.r=8,16 train.learning_rate=1e-4,2e-4   # 4 runs, compared in a table
  qlora chat adapter=outputs/smollm2_demo/RUN
  qlora generate adapter=outputs/smollm2_demo/RUN prompt="What's the capital of France?"
Errors exit 2 (bad input) or 1 (failed work); QLORA_DEBUG=1 shows tracebacks."""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # renamed-argument notices from the libraries, not actionable by users
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return _dispatch(argv)
    except (UserError, WorkError) as e:
        if os.environ.get("QLORA_DEBUG") == "1":
            raise
        print(f"qlora: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qlora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(len(v) for v in VERBS)
        print(USAGE.format(verbs="\n".join(f"  {v:<{width}}  {d[0]}" for v, d in VERBS.items())))
        return 0
    verb, rest = argv[0], argv[1:]
    if rest and f"{verb} {rest[0]}" in VERBS:  # two-word verbs: quant report
        verb, rest = f"{verb} {rest[0]}", rest[1:]
    if verb not in VERBS:
        raise UserError(f"unknown verb {verb!r}; choose one of: {', '.join(VERBS)} (qlora --help)")
    if verb == "recipes":
        return list_recipes()
    if "-h" in rest or "--help" in rest:
        print_config_help(verb)
        return 0
    if "--multirun" in rest or "-m" in rest:
        if verb != "train":
            raise UserError(f"--multirun sweeps training runs: qlora train --multirun key=a,b ... (not {verb})")
        from qlora.sweep import sweep

        return sweep([a for a in rest if a not in ("--multirun", "-m")])
    cfg = compose(VERBS[verb][1], rest)
    runner: Callable = _runner(verb)
    return runner(cfg) or 0


# verb -> (module, function): imported only when the verb runs
RUNNERS = {"train": ("qlora.train", "train"), "chat": ("qlora.chat", "chat_cli"),
           "generate": ("qlora.generate", "generate_cli"), "eval": ("qlora.evaluate", "evaluate_cli"),
           "merge": ("qlora.merge", "merge_cli"), "export": ("qlora.export", "export_cli"),
           "data check": ("qlora.data_check", "data_check_cli"),
           "quant report": ("qlora.quant_report", "quant_report_cli"), "quant ptq": ("qlora.ptq", "ptq_cli"),
           "plan": ("qlora.plan", "plan_cli")}


def _runner(verb: str) -> Callable:
    import importlib

    module, name = RUNNERS[verb]
    return getattr(importlib.import_module(module), name)


def split_overrides(args: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """Hydra overrides, plus the free-text values set after composition."""
    overrides, texts = [], {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if key and key[0] in "+~":
            raise UserError(f"{arg!r}: every key already exists; drop the {key[0]!r} (qlora VERB --help lists keys)")
        if not eq or not key:
            raise UserError(f"{arg!r} is not key=value; e.g. train.max_steps=100 (qlora VERB --help lists keys)")
        if key in FREE_TEXT:
            texts[FREE_TEXT[key]] = value
        elif key.split(".")[:2] == ["train", "lr_scheduler_kwargs"]:  # keys of the user's: added, or replaced
            overrides.append(f"++{arg}")
        elif key == "recipe":
            overrides += recipe_overrides(value)
        elif value.lower() in ("true", "false") and key in switch_keys():
            overrides.append(f"{key}='{value.lower()}'")  # the choice named true/false, not a bool
        else:
            overrides.append(f"{ALIASES.get(key, key)}={value}" if key in ALIASES else arg)
    return overrides, texts


def switch_keys() -> set:
    """Keys whose choices include 'true' and 'false' (auto|true|false): Hydra would read those as bools."""
    from dataclasses import fields

    from qlora.config import QLoraConfig, Switch

    return {f"{group.name}.{f.name}" for group in fields(QLoraConfig) if hasattr(group.default_factory, "__dataclass_fields__")
            for f in fields(group.default_factory) if f.type in (Switch, "Switch")}


def compose(config_name: str, args: List[str]):
    """The validated config object (a QLoraConfig) for a verb and its command-line overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from qlora.config import CONF_DIR, held_out_follows_data, register

    register()
    overrides, texts = split_overrides(args)
    file = next((recipe_file(v) for k, _, v in (a.partition("=") for a in args) if k == "recipe"), None)
    try:
        with recipes_found(file) as search, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3",
                                                                   job_name="qlora"):
            cfg = hydra_compose(config_name=config_name, overrides=[search] + overrides)
        for key, value in texts.items():
            OmegaConf.update(cfg, key, value, merge=False)
        return held_out_follows_data(OmegaConf.to_object(cfg))
    except (HydraException, OmegaConfBaseException) as e:
        message = explain_config_error(e)
        raise UserError(f"recipe={file}: {message}" if file and str(file) not in message else message) from None


def explain_config_error(e: Exception) -> str:
    """One line that names the key and the fix, from Hydra's and OmegaConf's messages."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    chain, x = [], e
    while isinstance(x, BaseException):
        chain.append(x)
        x = x.__cause__ or x.__context__
    keyed = next((c for c in chain if getattr(c, "full_key", None)), None)
    if keyed is not None:
        key, first = keyed.full_key, str(keyed).splitlines()[0]
        if isinstance(keyed, (ConfigKeyError, ConfigAttributeError)):
            near = difflib.get_close_matches(key, config_keys(), n=1, cutoff=0.8)
            return (f"{key}: no such key; " + (f"did you mean {near[0]}? " if near else "")
                    + "see `qlora VERB --help` for the keys of each group")
        if "is not a ListConfig" in first:
            return f"{key}: expects a list; write it as {key}=[a,b]"
        return f"{key}: {first}"
    text = str(e)
    if text.startswith("Ambiguous value for argument"):  # key=a,b: Hydra's sweep syntax
        arg = text.split("'")[1]
        return (f"{arg}: several values; to train once for each, add --multirun (qlora train --multirun {arg}); "
                f"for a list write {arg.partition('=')[0]}=[{arg.partition('=')[2]}]")
    if isinstance(e, MissingConfigException) and "Could not find" in text:
        missing = text.split("Could not find '")[1].split("'")[0]  # e.g. model/nope
        group, _, name = missing.rpartition("/")
        options = [ln.strip() for ln in text.split("Available options in")[1].splitlines()[1:]
                   if ln.startswith("\t") and "provider=" not in ln] if "Available options" in text else []
        hint = f"; choose one of: {', '.join(options)}" if options else ""
        return f"{group}={name}: no such {group} config{hint}"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    if any(s in text for s in ("mismatched input", "token recognition error", "no viable alternative",
                               "extraneous input")):
        return f"could not parse an override ({first}); quote values with spaces or commas, e.g. key='a b'"
    return first


def print_config_help(verb: str) -> None:
    from qlora.config import QLoraConfig

    desc, _, groups = VERBS[verb]
    print(f"qlora {verb}: {desc}\n\nkeys (type = default  # meaning); override with key=value:\n")
    lines = describe(QLoraConfig)
    keep, show = [], True
    for line in lines:
        if not line.startswith(" "):  # a top-level key or group header
            name = line.split(":")[0]
            show = name in groups or name not in GROUPS
        if show:
            keep.append(line)
    print("\n".join(keep))
    print("\nrecipe=NAME applies a preset from `qlora recipes` first (recipe=FILE.yaml one of your own, of the "
          "same keys); later overrides win.")
    if verb == "train":
        print("--multirun (or -m) with a key given several values (lora.r=8,16) trains once for each combination "
              "and compares the runs (README, Recipes and configuration).")


def config_keys() -> List[str]:
    """Every key a command line can set (group.key; data.columns' fields too), for "did you mean"."""
    from dataclasses import fields

    from qlora.config import QLoraConfig

    keys = []
    for f in fields(QLoraConfig):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if hasattr(default, "__dataclass_fields__"):
            keys += [f"{f.name}.{g.name}" for g in fields(default)]
            keys += [f"{f.name}.columns.{c}" for c in getattr(default, "columns", {})]
        else:
            keys.append(f.name)
    return keys


def describe(cls: type, prefix: str = "") -> List[str]:
    """One line per key of a config dataclass: name, type, default and docstring (for --help)."""
    import ast
    import inspect
    from dataclasses import fields
    from enum import Enum

    docs = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, nxt in zip(body, body[1:]):  # a field, then its docstring
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    lines = []
    obj = cls()
    for f in fields(cls):
        value = getattr(obj, f.name)
        if hasattr(value, "__dataclass_fields__"):
            lines.append(f"{prefix}{f.name}:")
            lines += describe(type(value), prefix + "  ")
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if isinstance(value, Enum):
            kind = "|".join(m.value for m in type(value))
            value = value.value
        lines.append(f"{prefix}{f.name}: {kind} = {value!r}  # {docs.get(f.name, '')}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
