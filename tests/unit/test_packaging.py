"""A non-editable install must carry conf/, recipes/, the demo data and the dequantization kernel's source inside the package."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_configs_recipes_and_demo_data(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("qlora-*.whl"))).namelist())
    expected = {"qlora/conf/train.yaml", "qlora/conf/model/smollm2_135m_instruct.yaml",
                "qlora/conf/train/gpu.yaml", "qlora/recipes/smollm2_demo.yaml",
                "qlora/demo/people_train.jsonl", "qlora/demo/people_eval.jsonl", "qlora/cli.py",
                "qlora/csrc/dequant_4bit.c"}
    assert expected <= names, expected - names
