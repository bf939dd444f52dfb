"""Recipes: the presets in recipes/ by name, and a YAML file of the user's own by its path
(recipe=path/to/mine.yaml), found for Hydra's compose; `qlora recipes` lists the built-in ones."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

from qlora.config import RECIPES_DIR
from qlora.errors import UserError

# the name in Hydra's `recipes` group of a recipe given as a file
FILE_RECIPE = "_recipe_file"


def recipe_overrides(value: str) -> List[str]:
    """Hydra's overrides for recipe=NAME (from recipes/) or recipe=FILE (recorded by its full path)."""
    file = recipe_file(value)
    if file is None:
        check_recipe_name(value)
        return [f"+recipes={value}", f"recipe={value}"]
    quoted = str(file).replace("\\", "\\\\").replace("'", "\\'")  # as Hydra reads a quoted value
    return [f"+recipes={FILE_RECIPE}", f"recipe='{quoted}'"]


def recipe_file(value: str) -> Optional[Path]:
    """The YAML file that recipe=PATH names (a value ending in .yaml or .yml, or holding a folder), or None
    for a recipe of `qlora recipes` by its name."""
    if not (value.endswith((".yaml", ".yml")) or "/" in value or os.sep in value):
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"recipe={value}: no such file (a recipe of your own is a YAML file of keys, e.g. "
                        "`train:` then `  max_steps: 100`; or one of `qlora recipes` by its name)")
    return path.resolve()


def read_recipe(file: Path) -> str:
    """A recipe file's text, refused unless it is YAML holding keys (a mapping); errors name file:line."""
    import yaml

    try:
        text = file.read_text()
        keys = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"recipe={file}: cannot be read ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise UserError(f"recipe={where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if keys is not None and not isinstance(keys, dict):
        raise UserError(f"recipe={file}: holds a {type(keys).__name__}, not keys; write e.g. `train:` then "
                        "`  max_steps: 100` on the next line")
    return text


@contextmanager
def recipes_found(file: Optional[Path]) -> Iterator[str]:
    """Hydra's search path override that finds the recipes: the built-in ones, and a recipe file given
    as a path, copied as recipes/FILE_RECIPE.yaml into a temporary folder searched first. A file without
    a `# @package` line is given `_global_`'s, so that its keys are the config's own, as in recipes/."""
    if file is None:
        yield f"hydra.searchpath=[file://{RECIPES_DIR.parent}]"
        return
    text = read_recipe(file)
    header = "" if any(ln.lstrip("# ").startswith("@package") for ln in text.splitlines()
                       if ln.startswith("#")) else "# @package _global_\n"
    with tempfile.TemporaryDirectory(prefix="qlora-recipe-") as tmp:
        (Path(tmp) / "recipes").mkdir()
        (Path(tmp) / "recipes" / f"{FILE_RECIPE}.yaml").write_text(header + text)
        yield f"hydra.searchpath=[file://{tmp},file://{RECIPES_DIR.parent}]"


def check_recipe_name(name: str) -> None:
    if not (RECIPES_DIR / f"{name}.yaml").is_file():
        names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise UserError(f"recipe={name}: no such recipe; choose one of: {names} (qlora recipes)")


def recipe_description(path) -> str:
    """The first comment line of a recipe that is not the package directive."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def list_recipes() -> int:
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    width = max(len(p.stem) for p in paths)
    for p in paths:
        print(f"{p.stem:<{width}}  {recipe_description(p)}")
    print(f"\nrun one: qlora train recipe=NAME [key=value ...]\nyour own: recipe=path/to/mine.yaml, a YAML file "
          f"of keys as in these ({RECIPES_DIR})")
    return 0
