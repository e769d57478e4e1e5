"""The scripts in examples/ run as a user runs them (a fresh process, another folder) and write what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SRC = Path(__file__).resolve().parents[1] / "src"


def run_example(name: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def check_figure(path: Path, rows: int, columns: int) -> None:
    """A PNG figure of ``rows`` × ``columns`` cells that is not blank."""
    assert path.is_file(), f"{path.name} was not written"
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 1000, "the figure is (nearly) blank"
    # vitlens.show draws square cells: the aspect ratio tells the grid
    assert abs(width / height - columns / rows) < 0.25 * columns / rows, (width, height, rows, columns)


def test_every_example_is_tested():
    tested = {"explain_your_model.py", "compare_methods.py", "evaluate_folder.py", "train_pm.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_explain_your_model(tmp_path):
    out = run_example("explain_your_model.py", tmp_path)
    assert "maps=[2, 7, 7]" in out  # the timm ViT at 112 px: a 7×7 grid
    assert "pm top-3: (4, 3, 8, 8)" in out
    check_figure(tmp_path / "explain_your_model.png", rows=4, columns=5)  # image, pm ×3, gae


def test_compare_methods(tmp_path):
    out = run_example("compare_methods.py", tmp_path)
    for method in ("pm", "gae", "rollout", "gradcam", "ig", "occlusion"):
        assert f"\n{method} " in f"\n{out}"
    check_figure(tmp_path / "compare_methods.png", rows=4, columns=7)


def test_evaluate_folder(tmp_path):
    out = run_example("evaluate_folder.py", tmp_path)
    assert "n = 20" in out
    results = json.loads((tmp_path / "evaluate_folder.json").read_text())
    assert results["n"] == 20
    assert set(results["results"]) == {"pm", "rollout"}
    for scores in results["results"].values():
        assert 0 <= scores["pointing-game"] <= 1 and 0 <= scores["maxboxacc-v2"] <= 1
    # the folder's labels line up with the model's classes: accuracy is that of the model, not chance
    assert results["accuracy"] > 0.5


def test_train_pm(tmp_path):
    out = run_example("train_pm.py", tmp_path)
    assert "pm maps: (4, 2, 8, 8)" in out
    check_figure(tmp_path / "train_pm.png", rows=4, columns=5)  # image, 2 targets × (20 steps, full run)
    assert not list(tmp_path.glob("*/model.safetensors")), "the checkpoint belongs in the temporary folder"


@pytest.mark.parametrize("name", ["explain_your_model.py", "compare_methods.py", "evaluate_folder.py", "train_pm.py"])
def test_examples_use_public_names_only(name):
    text = (EXAMPLES / name).read_text()
    assert "vitlens._" not in text and "import vitlens." not in text.replace("import vitlens.metrics", "")
