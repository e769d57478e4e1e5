"""benchmarks/pm_datasets.py: its pm.md section is regenerated in place from the records."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("pm_datasets", REPO / "benchmarks" / "pm_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(pm: float, best_baseline: float) -> dict:
    base = {b: {m: best_baseline if b == "rollout" else 0.1 for m in _script().METRICS} for b in _script().BASELINES}
    return {"data": "shapes", "profile": "quick", "labelled_share": 0.02, "train_images": 2000,
            "test_images_scored": 100,
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
    (tmp_path / "pm.md").write_text(first + "\nafter\n")
    (tmp_path / "records" / "shapes-quick.json").write_text(json.dumps(_record(0.3, 0.4)))
    script.write_table()
    second = (tmp_path / "pm.md").read_text()
    assert second.count(script.BEGIN) == 1 and second.endswith("\nafter\n") and second.startswith("# PM\n\nbefore\n")
    assert "| maxboxacc-v2 | 0.300 |" in second and "**0.600**" not in second
