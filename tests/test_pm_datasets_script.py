"""benchmarks/pm_datasets.py: its pm.md section is regenerated in place from the records."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest

from conftest import REPO
from vitlens.errors import VitlensError


def _script():
    spec = importlib.util.spec_from_file_location("pm_datasets", REPO / "benchmarks" / "pm_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(pm: float, best_baseline: float) -> dict:
    base = {b: {m: best_baseline if b == "rollout" else 0.1 for m in _script().METRICS} for b in _script().BASELINES}
    return {"data": "shapes", "profile": "quick", "labelled_share": 0.02, "train_images": 2000,
            "test_images_scored": 100,
            "classifier": {"arch": "fashion-vit", "overrides": {}, "steps": 250, "test_accuracy": 0.5, "lr": 0.002},
            "pm_command": "vitlens train pm --model WORK/classifier", "pm_chosen": ["vitlens: pm: 40 of 2,000 …"],
            "accuracy_before": 0.5, "accuracy_after": 0.55, "seconds": 10.0,
            "results_pm_model": {"pm": {m: pm for m in _script().METRICS}, **base},
            "results_base_model": base}  # fmt: skip


def test_section_is_replaced_in_place_and_pm_bold_only_when_best(tmp_path, monkeypatch):
    script = _script()
    monkeypatch.setattr(script, "PM_MD", tmp_path / "pm.md")
    monkeypatch.setattr(script, "RECORDS", tmp_path / "records")
    (tmp_path / "records").mkdir()
    (tmp_path / "pm.md").write_text("# PM\n\nbefore\n")
    (tmp_path / "records" / "shapes-quick.json").write_text(json.dumps(_record(0.6, 0.4)))
    script.write_table()
    first = (tmp_path / "pm.md").read_text()
    assert first.startswith("# PM\n\nbefore\n") and first.count(script.BEGIN) == 1
    assert "| maxboxacc-v2 | **0.600** | 0.100 / 0.100 | 0.400 / 0.400 |" in first
    assert "test accuracy 0.500 → 0.550 after PM (+5.0 points)" in first and "quick mode" in first
    assert "- classifier: fashion-vit architecture, 250 steps at lr 0.002" in first
    (tmp_path / "pm.md").write_text(first + "\nafter\n")
    (tmp_path / "records" / "shapes-quick.json").write_text(json.dumps(_record(0.3, 0.4)))
    script.write_table()
    second = (tmp_path / "pm.md").read_text()
    assert second.count(script.BEGIN) == 1 and second.endswith("\nafter\n") and second.startswith("# PM\n\nbefore\n")
    assert "| maxboxacc-v2 | 0.300 |" in second and "**0.600**" not in second


def _writer(name: str):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.parametrize("name", ["glyphs", "fashion_clutter"])
def test_written_data_sets_are_folder_data_with_boxes_around_their_masks(tmp_path, name):
    import numpy as np
    from PIL import Image

    from vitlens.data import open_dataset

    writer = _writer(name)
    try:
        writer.write_split(tmp_path / "a", "train", 12, labelled=0.5)
    except VitlensError as e:  # Fashion-MNIST not on this machine
        pytest.skip(str(e))
    writer.write_split(tmp_path / "b", "train", 12, labelled=0.5)
    lines = (tmp_path / "a" / "train" / "localization.txt").read_text().splitlines()
    assert len(lines) == 6 and lines == (tmp_path / "b" / "train" / "localization.txt").read_text().splitlines()
    data = open_dataset(f"folder:{tmp_path / 'a'}:train")
    assert len(data) == 12 and len(data.classes) == 10
    for line in lines:
        rel, *box = line.split(",")
        mask = np.asarray(Image.open(tmp_path / "a" / "train" / "masks" / rel)) > 127
        ys, xs = np.nonzero(mask)
        assert [int(v) for v in box] == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert (tmp_path / "a" / "train" / rel).read_bytes() == (tmp_path / "b" / "train" / rel).read_bytes()
