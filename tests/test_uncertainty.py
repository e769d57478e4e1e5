"""Bootstrap intervals and significance: every metric's weighted recomputation equals its result with unit
weights and a plain resample-and-recompute with the same draws; paired differences decide the best."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_protocols import PatchExplainer, edge_case_boxes, edge_case_maps, grid_batch, wsol_normalize, wsol_pxap
from vitlens.metrics import Batch, format_table, get_metric
from vitlens.metrics.localisation import thresholds_for
from vitlens.metrics.uncertainty import best_methods, bootstrap, resample_counts


def localisation_batch(seed=0):
    maps = np.stack(edge_case_maps()).astype(np.float32)
    n, size = len(maps), maps.shape[-1]
    rng = np.random.default_rng(seed)
    maps = maps + rng.random(maps.shape).astype(np.float32) * 0.05
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        x0, y0 = rng.integers(0, size // 2, 2)
        masks[i, y0 : y0 + 14, x0 : x0 + 16] = True
    boxes = [torch.from_numpy(b).float() for b in edge_case_boxes(n)]
    labels = torch.zeros(n, dtype=torch.long)
    logits = torch.from_numpy(rng.normal(size=(n, 3))).float()  # some "misclassified" images for top-1 loc
    batch = Batch(torch.zeros(n, 3, size, size), labels, labels, torch.arange(n) * 3 + 1, boxes=boxes,
                  masks=torch.from_numpy(masks), logits=logits)  # fmt: skip
    return batch, torch.from_numpy(maps)


LOCALISATION = ("pointing-game", "energy-pointing-game", "maxboxacc", "maxboxacc-v2", "top1-loc", "pxap", "miou")


def finished(name, batch, maps, **options):
    batch.cache = {}
    m = get_metric(name, **options)
    m.update(batch, maps)
    m.finish()
    return m


@pytest.mark.parametrize("name", LOCALISATION)
def test_unit_weights_give_the_result(name):
    batch, maps = localisation_batch()
    m = finished(name, batch, maps)
    stats = m.statistic(np.ones((2, len(m.index))))
    for key, value in m.result().items():
        assert stats[key] == pytest.approx([value, value], abs=1e-12), key


def test_grid_and_sanity_unit_weights():
    m = get_metric("grid-pointing-game", protocol="bcos")
    m.update(grid_batch(PatchExplainer(2)), torch.zeros(3, 4, 4))
    m.finish()
    assert m.statistic(np.ones((1, len(m.index))))["grid-pointing-game"][0] == pytest.approx(m.result()[m.name])
    # cells move with their image: weight 0 on image 0 drops both its cells
    w = np.array([[0.0 if i == 0 else 1.0 for i in m.index]])
    assert m.statistic(w)[m.name][0] == pytest.approx(m.records["score"][m.index != 0].mean())


def test_weighted_statistic_equals_resampling_the_images():
    """The reference bootstrap: gather the images each replicate draws (with repeats) and recompute the metric
    from scratch (wsolevaluation's PxAP and box accuracy, plain means)."""
    batch, maps = localisation_batch(1)
    counts = resample_counts(len(maps), replicates=20, seed=3)
    th = thresholds_for(0.01)
    for name in ("pointing-game", "maxboxacc", "maxboxacc-v2", "pxap"):
        m = finished(name, batch, maps)
        got = m.statistic(counts)[name]
        for r, c in enumerate(counts.astype(int)):
            take = np.repeat(np.arange(len(maps)), c)
            if name == "pointing-game":
                want = m.records["hit"][take].mean()
            elif name == "pxap":
                scores = [wsol_normalize(x) for x in maps.numpy()[take]]
                want = wsol_pxap(scores, batch.masks.numpy()[take].astype(np.uint8), th)
            else:
                sub = Batch(batch.images[take], batch.labels[take], batch.labels[take], batch.index[take],
                            boxes=[batch.boxes[i] for i in take])  # fmt: skip
                want = finished(name, sub, maps[take]).result()[name]
            assert got[r] == pytest.approx(want, abs=1e-12), (name, r)


def test_bootstrap_is_paired_and_seeded():
    batch, maps = localisation_batch()
    noisy = maps + torch.rand(maps.shape, generator=torch.Generator().manual_seed(0))
    metrics = {"good": {"miou": finished("miou", batch, maps)}, "noisy": {"miou": finished("miou", batch, noisy)}}
    intervals, samples = bootstrap(metrics, replicates=200, seed=0)
    again, _ = bootstrap(metrics, replicates=200, seed=0)
    assert intervals == again
    counts = resample_counts(len(maps), replicates=200, seed=0)  # the draws, made in chunks of 100
    assert np.array_equal(samples["good"]["miou"], metrics["good"]["miou"].statistic(counts)["miou"])
    for method in metrics:
        lo, hi = intervals[method]["miou"]
        assert lo <= metrics[method]["miou"].result()["miou"] <= hi
    # the same method twice: every paired difference is exactly 0, a tie
    twin = {"a": metrics["good"], "b": {"miou": finished("miou", batch, maps)}}
    _, s = bootstrap(twin, replicates=50)
    assert np.array_equal(s["a"]["miou"], s["b"]["miou"])


def test_best_methods_marks_only_significant_differences():
    rng = np.random.default_rng(0)
    base = rng.normal(size=500)
    samples = {"a": {"x": base + 1.0}, "b": {"x": base + 0.99}, "c": {"x": base}, "d": {"x": base + 1.0}}
    results = {m: {"x": float(v["x"].mean())} for m, v in samples.items()}
    out = best_methods({k: results[k] for k in "abc"}, samples, {"x": 1})
    assert out["x"]["best"] == ["a"] and out["x"]["significant"]  # paired: 0.01 apart, always
    noisy = {"a": {"x": rng.normal(size=500)}, "b": {"x": rng.normal(size=500)}}
    res = {m: {"x": float(v["x"].mean())} for m, v in noisy.items()}
    out = best_methods(res, noisy, {"x": 1})
    assert set(out["x"]["best"]) == {"a", "b"} and not out["x"]["significant"]  # unpaired noise: a tie
    out = best_methods({k: results[k] for k in "ad"}, samples, {"x": 1})
    assert set(out["x"]["best"]) == {"a", "d"}  # saturated, identical: a tie, not a star
    low = best_methods({k: results[k] for k in "abc"}, samples, {"x": -1})
    assert low["x"]["best"] == ["c"] and low["x"]["significant"]
    assert best_methods(results, samples, {"x": 0}) == {}


def test_table_shows_intervals_and_marks():
    summary = {
        "model": "m", "data": "d", "n": 4, "accuracy": 1.0, "used": {"deletion": 4},
        "results": {"a": {"deletion": 0.1}, "b": {"deletion": 0.3}},
        "seconds": {"a": 1.0, "b": 2.0},
        "intervals": {"a": {"deletion": [0.05, 0.15]}, "b": {"deletion": [0.2, 0.4]}},
        "best": {"deletion": {"best": ["a"], "significant": True, "versus": {}}},
        "bootstrap": {"replicates": 1000, "seed": 0, "level": 0.95},
    }  # fmt: skip
    table = format_table(summary)
    assert "0.1000 [0.050, 0.150] *" in table and "0.3000 [0.200, 0.400]" in table
    assert "95% bootstrap interval" in table
    summary["best"]["deletion"] = {"best": ["a", "b"], "significant": False, "versus": {}}
    table = format_table(summary)
    assert "0.1000 [0.050, 0.150] =" in table and "0.3000 [0.200, 0.400] =" in table


def test_evaluate_reports_intervals_and_the_best(tmp_path):
    import json

    from conftest import committed
    from vitlens.metrics import evaluate

    out = tmp_path / "r.json"
    summary = evaluate(committed("counting-vit"), "attention,rollout", "pointing-game,deletion,maxboxacc",
                       "counting:test", limit=16, batch_size=8, progress=False, out=out, replicates=300)  # fmt: skip
    assert summary["bootstrap"] == {"replicates": 300, "seed": 0, "level": 0.95, "unit": "image"}
    for method, values in summary["results"].items():
        for key, v in values.items():
            lo, hi = summary["intervals"][method][key]
            assert lo <= v + 1e-12 and v <= hi + 1e-12, (method, key)
    for key in ("pointing-game", "deletion", "maxboxacc"):
        best = summary["best"][key]
        assert set(best["best"]) <= {"attention", "rollout"} and best["significant"] == (len(best["best"]) == 1)
    saved = json.loads(out.read_text())
    assert saved["intervals"] == json.loads(json.dumps(summary["intervals"]))
    assert len(saved["per_image"]["attention"]["deletion"]["probability"]) == 16  # per-image values kept
    none = evaluate(committed("counting-vit"), "attention", "deletion", "counting:test", limit=4, progress=False,
                    replicates=0)  # fmt: skip
    assert none["best"] == {} and none["intervals"] == {"attention": {}}
    assert "bootstrap interval" not in format_table(none)
