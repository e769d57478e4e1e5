"""``vitlens evaluate``: the driver end to end on the counting classifier, its CLI, its errors, and a sharded
run (two CPU processes under torchrun) that must equal the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, committed
from conftest import run_cli as run
from vitlens import VitlensError, load_model
from vitlens.data import open_dataset
from vitlens.metrics import METRICS, evaluate, format_table

SUMMARY_KEYS = {
    "model",
    "data",
    "n",
    "accuracy",
    "results",
    "seconds",
    "used",
    "skipped",
    "intervals",
    "best",
    "bootstrap",
}
APPLICABLE = sorted(n for n in set(METRICS) - {"grid-pointing-game"} if METRICS[n].in_all)  # all: not ROAD


@pytest.fixture(scope="module")
def counting_run(tmp_path_factory):
    model = committed("counting-vit")
    out = tmp_path_factory.mktemp("eval") / "results.json"
    summary = evaluate(model, "rollout,attention", "all", "counting:test", limit=32, batch_size=16, out=out,
                       progress=False)  # fmt: skip
    return model, summary, json.loads(out.read_text())


def test_evaluate_end_to_end(counting_run):
    model, summary, full = counting_run
    assert set(summary) == SUMMARY_KEYS
    assert summary["n"] == 32 and summary["accuracy"] == 1.0  # the committed classifier is perfect
    assert list(summary["results"]) == ["rollout", "attention"] and set(summary["seconds"]) == {"rollout", "attention"}
    with_cells = sum(open_dataset("counting:test")[i]["label"] > 0 for i in range(32))
    for name in APPLICABLE:
        expected = (
            32
            if name in ("deletion", "insertion", "positive-perturbation", "negative-perturbation", "sanity")
            else with_cells
        )
        assert summary["used"][name] == expected, name
    for method, values in summary["results"].items():
        assert {k.split("/")[0] for k in values} == set(APPLICABLE)
        for key, v in values.items():
            if v is None:  # the sanity verdict may be undecided
                assert key == "sanity/pass", (method, key)
                continue
            low = -1.0 if key.startswith("sanity") else 0.0
            assert low <= v <= 1.0, (method, key, v)
    # the file: the same summary plus per-image values (data-set order) and curves
    assert {k: full[k] for k in SUMMARY_KEYS} == json.loads(json.dumps(summary))
    per = full["per_image"]["rollout"]
    assert per["deletion"]["index"] == list(range(32)) and len(per["deletion"]["probability"]) == 32
    assert len(per["maxboxacc-v2"]["index"]) == with_cells
    assert np.mean(per["pointing-game"]["hit"]) == pytest.approx(summary["results"]["rollout"]["pointing-game"])
    curves = full["curves"]["attention"]
    assert len(curves["deletion"]["probability"]) == 10  # 3×3 patches: K = 9 steps, 10 points
    assert curves["sanity"]["levels"] == ["head", "final-norm", "block2", "block1", "block0", "position", "patch-embed"]
    assert len(curves["maxboxacc-v2"]["accuracy"]) == 3 and len(curves["maxboxacc-v2"]["threshold"]) == 100
    deletion = {"fill": "mean", "granularity": "patch", "steps": 16, "protocol": "vitlens"}
    assert full["settings"]["metrics"]["deletion"] == deletion


def test_evaluate_is_batch_size_invariant_and_leaves_the_model_alone(counting_run):
    model, summary, _ = counting_run
    backbone = load_model(model)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    flags = [p.requires_grad for p in backbone.parameters()]
    again = evaluate(backbone, ["rollout", "attention"], APPLICABLE, "counting:test", limit=32, batch_size=11,
                     progress=False)  # fmt: skip
    for method in summary["results"]:
        assert again["results"][method] == pytest.approx(summary["results"][method], abs=1e-6)
    assert again["used"] == summary["used"]
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in backbone.parameters()] == flags and not backbone.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.modules())


def test_format_table(counting_run):
    _, summary, _ = counting_run
    table = format_table(summary)
    assert "accuracy 1.0000" in table and "deletion ↓" in table and "insertion ↑" in table
    assert table.splitlines()[3].split() == ["metric", "n", "rollout", "attention"]
    assert table.splitlines()[-4].startswith("seconds")  # then the legend of the intervals and marks
    assert "95% bootstrap interval over images" in table and " [" in table.splitlines()[4]


def test_cli_json_and_table(capsys):
    model = str(committed("counting-vit"))
    args = ["evaluate", "--model", model, "--methods", "attention", "--metrics", "pointing-game,deletion",
            "--data", "counting:test", "--limit", "8", "--batch-size", "4", "--option", "deletion.steps=3"]  # fmt: skip
    code, out, err = run([*args, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)  # exactly one JSON object on stdout; the progress bar went to stderr
    assert set(summary) == SUMMARY_KEYS and summary["n"] == 8
    assert set(summary["results"]["attention"]) == {"pointing-game", "deletion"}
    code, out, err = run(args, capsys)
    assert code == 0 and "pointing-game ↑" in out and "deletion ↓" in out
    code, out, _ = run(["metrics"], capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == sorted(METRICS)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "nope"], "unknown method 'nope' (known: "),
        (["--metrics", "deletion,nope"], "unknown metric 'nope' (known: deletion, "),
        (["--data", "nope:test"], "unknown data set 'nope'"),
        (["--metrics", "grid-pointing-game"], "does not apply to this data set (it needs fashion-grid"),
        (["--option", "deletion"], "expected NAME.KEY=VALUE"),
        (["--option", "deletion.fill=grey"], "fill='grey' is not one of mean, blur, zero, noise"),
        (["--option", "deletion.nope=1"], "deletion: unknown option(s) nope"),
        (["--option", "insertion.fill=zero"], "options given for 'insertion', which is not among the chosen"),
        (["--option", "attention.x=1"], "attention: unknown option(s) x"),
    ],
)
def test_cli_errors(extra, message, capsys):
    base = {"--model": str(committed("counting-vit")), "--methods": "attention", "--metrics": "deletion",
            "--data": "counting:test", "--limit": "2"}  # fmt: skip
    args = ["evaluate"]
    for k, v in base.items():
        if k not in extra:
            args += [k, v]
    code, out, err = run(args + extra, capsys)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sharded_equals_unsharded(tmp_path):
    model = str(committed("counting-vit"))
    common = ["--model", model, "--methods", "rollout,attention", "--data", "counting:test", "--limit", "21",
              "--batch-size", "4", "--json"]  # fmt: skip
    single = evaluate(model, "rollout,attention", "all", "counting:test", limit=21, batch_size=4,
                      out=tmp_path / "single.json", progress=False)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitlens",
         "evaluate", *common, "--out", str(tmp_path / "sharded.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout)  # only the main process prints
    assert sharded["n"] == single["n"] == 21 and sharded["accuracy"] == single["accuracy"]
    assert sharded["used"] == single["used"]
    for method in single["results"]:
        # float32 forward passes over other batch compositions: equal up to float rounding
        assert sharded["results"][method] == pytest.approx(single["results"][method], abs=1e-6)
    a = json.loads((tmp_path / "single.json").read_text())
    b = json.loads((tmp_path / "sharded.json").read_text())
    assert b["settings"]["world_size"] == 2
    for method in a["per_image"]:
        for metric, values in a["per_image"][method].items():
            assert b["per_image"][method][metric].keys() == values.keys()
            for key, v in values.items():
                assert np.allclose(b["per_image"][method][metric][key], v, atol=1e-6), (method, metric, key)


def test_accuracy_only_for_one_label_per_image():
    """A fashion-grid image holds four objects: its ``label`` (the first cell's class) is not the answer,
    so no accuracy is reported there; a single-object data set gets the true accuracy."""
    model = load_model(committed("fashion-vit"))
    grid = evaluate(model, "rollout", "grid-pointing-game", "fashion-grid:test", limit=8, progress=False)
    assert grid["accuracy"] is None and grid["n"] == 8
    canvas = evaluate(model, "rollout", "pointing-game", "fashion-canvas:test", limit=16, progress=False)
    data = open_dataset("fashion-canvas:test")
    images = torch.stack([data[i]["image"] for i in range(16)])
    with torch.no_grad():
        expected = (model(images).argmax(1) == torch.tensor([data[i]["label"] for i in range(16)])).float().mean()
    assert canvas["accuracy"] == pytest.approx(expected.item())


def interrupt_after(monkeypatch, batches: int):
    """Make the next evaluation raise KeyboardInterrupt when it reaches batch ``batches + 1`` (as Ctrl-C would);
    returns a function that undoes it."""
    import importlib

    ev = importlib.import_module("vitlens.metrics.evaluate")  # the module (the package exports the function)
    fit_to, calls = ev.fit_to, []

    def interrupted(batch, size):
        calls.append(1)
        if len(calls) == batches + 1:
            raise KeyboardInterrupt
        return fit_to(batch, size)

    monkeypatch.setattr(ev, "fit_to", interrupted)
    return lambda: monkeypatch.setattr(ev, "fit_to", fit_to)


def test_an_interrupted_evaluation_resumes_to_the_same_results(tmp_path, monkeypatch):
    """Ctrl-C after two batches keeps their state; --resume continues with the third and gives exactly the results
    (summary, per-image values, curves) of an uninterrupted run, then removes the state file."""
    from vitlens.metrics.progress import partial_path

    args = dict(model=committed("counting-vit"), methods="rollout,gradcam", data="counting:test", limit=24,
                metrics="pointing-game,maxboxacc-v2,pxap,deletion,sanity", batch_size=6, progress=False, gallery=0,
                replicates=50)  # fmt: skip
    whole = evaluate(**args, out=tmp_path / "whole.json")
    undo = interrupt_after(monkeypatch, 2)
    out = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate(**args, out=out, checkpoint_every_s=0)
    assert not out.exists() and partial_path(out, 0).is_file()
    undo()
    with pytest.raises(VitlensError, match="settings differ from the interrupted run"):
        evaluate(**{**args, "limit": 18}, out=out, resume=True)
    resumed = evaluate(**args, out=out, resume=True)
    assert resumed["results"] == whole["results"] and resumed["intervals"] == whole["intervals"]
    a, b = json.loads((tmp_path / "whole.json").read_text()), json.loads(out.read_text())
    assert a["per_image"] == b["per_image"] and a["curves"] == b["curves"] and a["images"] == b["images"]
    assert not partial_path(out, 0).exists()
    with pytest.raises(VitlensError, match="no interrupted evaluation"):
        evaluate(**args, out=out, resume=True)


def test_evaluate_resume_from_the_command_line(tmp_path, capsys, monkeypatch):
    import importlib

    ev = importlib.import_module("vitlens.metrics.evaluate")
    undo = interrupt_after(monkeypatch, 1)
    monkeypatch.setattr(ev.evaluate, "__kwdefaults__", {**ev.evaluate.__kwdefaults__, "checkpoint_every_s": 0.0})
    args = ["evaluate", "--model", committed("counting-vit"), "--methods", "rollout", "--metrics", "pointing-game",
            "--data", "counting:test", "--limit", "8", "--batch-size", "4",
            "--out", str(tmp_path / "r.json")]  # fmt: skip
    code, _, err = run(args, capsys)
    messages = [line for line in err.replace("\r", "\n").splitlines() if "vitlens:" in line]
    assert code == 130 and len(messages) == 1 and "--resume" in messages[0] and "Traceback" not in err
    undo()
    code, out, err = run([*args, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["used"]["pointing-game"] == 8


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.replace('"format": "vitlens-evaluation-state"', '"format": "other"'),
        lambda s: s.replace('"tensor": "float64"', '"tensor": "complex128"', 1),
        lambda s: s.replace('"done": ', '"done": -', 1),
        lambda s: s[: len(s) // 2],
        lambda s: json.dumps(
            {**json.loads(s), "metrics": {"rollout": {"pointing-game": {"sums": {"dict": {"n": {"value": "x"}}}}}}}
        ),  # fmt: skip
        lambda s: json.dumps(
            {**json.loads(s), "metrics": {"rollout": {"pointing-game": {"_index": {"list": [{"value": "a"}]}}}}}
        ),  # fmt: skip
        lambda s: json.dumps({**json.loads(s), "metrics": {"rollout": {"pointing-game": {"result": {"value": 1}}}}}),
    ],
)
def test_a_damaged_evaluation_state_is_refused_in_one_line(tmp_path, monkeypatch, damage):
    from vitlens.metrics.progress import partial_path

    args = dict(model=committed("counting-vit"), methods="rollout", metrics="pointing-game", data="counting:test",
                limit=8, batch_size=4, progress=False, gallery=0, replicates=0, out=tmp_path / "r.json")  # fmt: skip
    undo = interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        evaluate(**args, checkpoint_every_s=0)
    undo()
    state = partial_path(tmp_path / "r.json", 0)
    state.write_text(damage(state.read_text()))
    with pytest.raises(VitlensError) as err:
        evaluate(**args, resume=True)
    assert "\n" not in str(err.value)
