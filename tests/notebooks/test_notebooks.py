"""The notebooks run top to bottom on CPU against the installed package; their Colab install cell
pins the versions CI tests."""
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def cells(path):
    return json.loads(path.read_text())["cells"]


def test_every_notebook_has_a_colab_badge_and_a_pinned_colab_only_install():
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    slug = repo.split("github.com/")[1]
    pins = dict(line.split("==") for line in (ROOT / ".ci/constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "quantization", "custom_data"}
    for nb in NOTEBOOKS:
        first, install = ("".join(c["source"]) for c in cells(nb)[:2])
        badge = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{nb.name}"
        assert badge in first, nb.name
        assert 'if "google.colab" in sys.modules:' in install and f"git+{repo}@" in install, nb.name
        pinned = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', install))
        assert pinned and {k: pins.get(k) for k in pinned} == pinned, f"{nb.name}: pins differ from .ci/constraints.txt"
        assert all(c.get("outputs") in (None, []) for c in cells(nb)), f"{nb.name}: saved with outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    print(text[-3000:])
    if path.stem == "quantization":
        assert "identical to bitsandbytes: True" in text
    if path.stem == "custom_data":
        assert "refused: " in text and "dates_bad.jsonl:241" in text
