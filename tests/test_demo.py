"""``vitlens demo``: the tables it runs, the training commands it documents, a missing checkpoint, ``--train``,
and the demo end to end with the numbers of its report equal to ``vitlens evaluate`` on the same images."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import PRETRAINED, committed
from conftest import run_cli as run
from vitlens import demo
from vitlens.cli import build_parser
from vitlens.errors import VitlensError
from vitlens.explainers import EXPLAINERS
from vitlens.metrics import METRICS


def test_tables_name_real_methods_metrics_and_commands():
    for name, methods in demo.RUNS:
        assert name in demo.TRAINING and set(methods) <= set(EXPLAINERS)
    for _, _, metrics, n in demo.METRIC_GROUPS:
        assert set(metrics) <= set(METRICS) and n > 0
    parser = build_parser()
    for name, (commands, minutes) in demo.TRAINING.items():
        assert minutes > 0
        for command in commands:
            parser.parse_args(demo.split_launcher(command)[1])  # a valid command line (argparse exits otherwise)
        last = shlex.split(commands[-1])
        assert last[last.index("--out") + 1] == f"checkpoints/{name}"
    order = demo.needed(["fashion-vit-pm", "fashion-bcos-vit"])
    assert order.index("fashion-vit") < order.index("fashion-vit-pm") and "fashion-vit-diffmask" not in order


def normalised(command: str) -> list[str]:
    """A command's ``vitlens`` arguments without the values of ``--init`` and ``--out`` (where each stage was
    kept is not part of how it was trained: the table chains its stages, the recorded runs were copied into
    the package). A run records its arguments and its number of processes, not its launcher."""
    args = demo.split_launcher(command)[1]
    for flag in ("--init", "--out"):
        if flag in args:
            del args[args.index(flag) : args.index(flag) + 2]
    return args


def processes(command: str) -> int:
    """How many training processes a documented command starts (``torchrun --nproc_per_node N``)."""
    launcher = " ".join(demo.split_launcher(command)[0])
    found = re.search(r"--nproc[_-]per[_-]node[ =](\d+)", launcher)
    return int(found.group(1)) if found else 1


def recorded_commands(training: dict) -> list[tuple[str, int]]:
    """The (command, processes) recorded in a checkpoint's ``training`` section, first stage first (``init``
    chains)."""
    commands = []
    while training:
        commands.insert(0, (training.get("command"), training.get("world_size", 1)))
        training = (training.get("init") or {}).get("training") if isinstance(training.get("init"), dict) else None
    return commands


@pytest.mark.parametrize("name", sorted(demo.TRAINING))
def test_training_table_is_the_recorded_commands(name):
    """The committed checkpoint was made by the table's commands (``config.json`` records every stage)."""
    committed(name)
    config = json.loads((PRETRAINED / name / "config.json").read_text())
    recorded = recorded_commands(config.get("training") or {})
    if not recorded or any(c is None for c, _ in recorded):
        pytest.skip(f"{name} does not record its commands")
    table = [(normalised(c), processes(c)) for c in demo.TRAINING[name][0]]
    assert table == [(normalised(c), n) for c, n in recorded], (
        f"demo.TRAINING[{name!r}] differs from {name}/config.json: update the table (docs/pretrained.md quotes it)"
    )


def test_training_argv_writes_under_the_output_folder(tmp_path):
    argv = demo.training_argv(demo.TRAINING["fashion-vit-pm"][0][0], tmp_path)
    assert argv[:2] == ["train", "pm"]
    assert argv[argv.index("--model") + 1] == str(tmp_path / "checkpoints" / "fashion-vit")
    assert argv[argv.index("--out") + 1] == str(tmp_path / "checkpoints" / "fashion-vit-pm")
    assert "fashion-canvas:train" in argv


def test_missing_checkpoints_are_one_line_each(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITLENS_CHECKPOINTS", str(tmp_path / "none"))
    code, out, err = run(["demo", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    for name, _ in demo.RUNS:
        assert any(f"checkpoint {name} missing" in line and "vitlens demo --train" in line for line in lines), name
    assert "none of the demo's checkpoints" in lines[-1]
    with pytest.raises(VitlensError, match="none of the demo's checkpoints"):
        demo.run_demo(tmp_path / "out", progress=False)


def test_split_launcher():
    assert demo.split_launcher("vitlens train pm --out x") == ([], ["train", "pm", "--out", "x"])
    assert demo.split_launcher("torchrun --standalone --nproc_per_node 2 -m vitlens train classifier") == (
        ["torchrun", "--standalone", "--nproc_per_node", "2"], ["train", "classifier"])  # fmt: skip
    assert processes("torchrun --nproc-per-node=4 -m vitlens train classifier") == 4
    for bad in ("python train.py", "torchrun -m other train", "torchrun --standalone -m"):
        with pytest.raises(ValueError, match="not a vitlens"):
            demo.split_launcher(bad)


@pytest.mark.parametrize("launcher", ["vitlens", "torchrun --standalone --nproc_per_node 2 -m vitlens"])
def test_train_runs_the_table_then_reports(tmp_path, monkeypatch, launcher):
    """``--train`` runs the documented commands (here a 2-step stand-in table, in this process or as two
    processes under torchrun), writing under the output folder, then evaluates the new checkpoints."""
    monkeypatch.setattr(demo, "TRAINING", {"tiny": ((
        f"{launcher} train classifier --arch counting-vit --data counting:train:n=64 --eval-data counting:test:n=16 "
        "--out checkpoints/tiny --max-steps 2 --batch-size 8 --warmup-steps 1",), 1)})  # fmt: skip
    monkeypatch.setattr(demo, "RUNS", (("tiny", ("rollout",)),))
    monkeypatch.setattr(demo, "METRIC_GROUPS", (("localisation", "counting:test", ("pointing-game",), 4),))
    lines = []
    summary = demo.run_demo(tmp_path / "out", train=True, gallery=2, log=lines.append, progress=False)
    assert "about 1 min" in lines[0]  # says up front how long it takes
    config = json.loads((tmp_path / "out" / "checkpoints" / "tiny" / "config.json").read_text())
    assert config["training"]["world_size"] == processes(demo.TRAINING["tiny"][0][0])
    results = json.loads(Path(summary["results"][0]).read_text())
    assert results["model"] == str(tmp_path / "out" / "checkpoints" / "tiny") and results["n"] == 4
    assert Path(summary["report"]).is_file() and Path(summary["gallery"]).is_file()


def table_values(page: str) -> dict[str, dict[str, str]]:
    """The report's main metric table as {method: {metric: printed value}}."""
    table = page.split('<section id="metrics">')[1].split("<details>")[0]
    header = re.findall(r"<th>([a-z0-9-]+)", table)
    out = {}
    for row in re.findall(r"<tr><td class='l m'>(.*?)</tr>", table):
        method = re.search(r"<b>([a-z]+)</b>", row).group(1)
        out[method] = dict(
            zip(
                header,
                re.findall(r'<td(?: class=\w+)?>([^<]*)(?:<span class="ci">[^<]*</span>)?</td>', row),
                strict=True,
            )
        )
    return out


@pytest.mark.slow
def test_demo_end_to_end_equals_evaluate(tmp_path, capsys):
    committed("fashion-vit-pm")
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--out", str(out), "-n", "12", "--gallery", "4"], capsys)
    assert code == 0, err
    assert stdout.strip() == f"report: {out / 'report.html'}"
    page = (out / "report.html").read_text()
    for section in ("run", "gallery", "meanings", "bcos", "metrics", "curves", "cost"):
        assert f'<section id="{section}">' in page
    for name, _ in demo.RUNS:
        present = (PRETRAINED / name / "config.json").is_file()
        assert (f"checkpoint {name} missing" in err) != present
    printed = table_values(page)
    name, methods = demo.RUNS[0]
    for group, data, metrics, _ in demo.METRIC_GROUPS:
        code, stdout, _ = run(["evaluate", "--model", f"vitlens:{name}", "--methods", ",".join(methods),
                               "--metrics", ",".join(metrics), "--data", data, "--limit", "12", "--batch-size", "64",
                               "--json"], capsys)  # fmt: skip
        assert code == 0
        summary = json.loads(stdout)
        saved = json.loads((out / "results" / f"{name}.{group}.json").read_text())
        assert saved["results"] == summary["results"] and saved["n"] == summary["n"] == 12
        for method in methods:
            for key in metrics:
                value = summary["results"][method][key]
                assert printed[method][key] == ("—" if value is None else f"{value:.3f}"), (method, key)
