"""Packaging: the shipped named models, light start-up (no torch for --help), every option's help and default,
optional dependencies as extras with one-line errors, the embedded colour maps, schedules that fit the run."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PRETRAINED, REPO, run_cli
from vitlens import VitlensError, load_model, pretrained
from vitlens._utils import require
from vitlens.cli import build_parser
from vitlens.training.loop import fit_warmup
from vitlens.viz.colormaps import NAMES, apply_colormap, colormap

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "torchvision", "timm", "transformers", "matplotlib", "numpy", "scipy")


def python(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports vitlens from this checkout."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ,
                          timeout=300)  # fmt: skip


def parsers(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser with its argv prefix."""
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += parsers(sub, (*prefix, name))
    return found


# --- start-up --------------------------------------------------------------------------------------------


def test_import_and_every_help_and_version_import_no_torch():
    """Not a timing test: whatever the machine, ``--help`` must not pay for torch, timm or transformers."""
    proc = python(f"""
        import argparse, contextlib, io, sys
        import vitlens
        heavy = {HEAVY!r}
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        from vitlens.cli import build_parser, main

        def walk(parser, prefix=()):
            yield prefix
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        yield from walk(sub, (*prefix, name))

        commands = list(walk(build_parser()))
        for argv in [[*c, "--help"] for c in commands] + [["--version"]]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main(argv)
                except SystemExit as e:
                    assert e.code == 0, (argv, e.code)
            assert out.getvalue().strip(), argv
            loaded = [m for m in heavy if m in sys.modules]
            assert not loaded, (argv, loaded)
        print(len(commands))
        """)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 14  # vitlens, its commands and the train tasks


def test_vitlens_models_needs_no_torch():
    proc = python("""
        import sys
        from vitlens.cli import main
        assert main(["models"]) == 0
        assert "torch" not in sys.modules
        """)
    assert proc.returncode == 0, proc.stderr
    for name in pretrained.names():
        assert f"vitlens:{name}" in proc.stdout


def test_lazy_names_resolve():
    import vitlens

    assert vitlens.load_model is load_model and callable(vitlens.explain) and isinstance(vitlens.Backbone, type)
    assert {"load_model", "explain", "Backbone", "VitlensError"} <= set(dir(vitlens))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vitlens.nope  # noqa: B018


# --- every option explains itself ----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [c for c, _ in parsers(build_parser())], ids=lambda c: " ".join(c) or "vitlens")
def test_every_option_has_a_meaning_and_shows_its_default(argv):
    parser = dict(parsers(build_parser()))[argv]
    text = "".join(parser.format_help().split())  # no white space: argparse wraps lines, even at hyphens
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        if isinstance(action, argparse._SubParsersAction):
            assert all(a.help for a in action._choices_actions), f"{argv}: a subcommand without help"
            continue
        assert action.help, f"{' '.join(argv)} {name}: no help"
        if not action.option_strings or isinstance(action, argparse._StoreTrueAction | argparse._AppendAction):
            continue  # positionals, flags and repeatable options have no default to show
        if action.required:
            assert "".join(f"{action.help} (required)".split()) in text, name
        elif action.default is None:
            assert "default" in action.help, f"{' '.join(argv)} {name}: say what happens when it is not given"
        else:
            assert "".join(f"(default:{action.default})".split()) in text, f"{' '.join(argv)} {name}: default not shown"


# --- named models -----------------------------------------------------------------------------------------


def test_named_models_load_like_their_directories():
    assert pretrained.names() == sorted(pretrained.DESCRIPTIONS)
    for name in ("counting-vit", "fashion-vit-diffmask"):
        named, by_path = load_model(f"vitlens:{name}"), load_model(PRETRAINED / name)
        assert not named.training and named.classes == by_path.classes
        for (k, v), w in zip(named.model.state_dict().items(), by_path.model.state_dict().values(), strict=True):
            assert torch.equal(v, w), k


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("vitlens:nope", r"^unknown vitlens model 'nope' \(known: counting-vit, .*fashion-vit-pm\)$"),
        ("vitlens:fashion-vit?pretrained=0", r"^vitlens:fashion-vit\?pretrained=0: a vitlens model takes no options"),
        ("vitlens:", r"names no model"),
        ("nope", r"vitlens:NAME"),
    ],
)
def test_named_model_errors_are_one_line(uri, message):
    with pytest.raises(VitlensError, match=message) as e:
        load_model(uri)
    assert "\n" not in str(e.value)


def test_models_command_lists_every_model_with_its_figures(capsys):
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert sorted(rows) == [f"vitlens:{n}" for n in pretrained.names()]
    for name, row in rows.items():
        config = json.loads((PRETRAINED / name.split(":")[1] / "config.json").read_text())
        training = config["training"]
        assert row["kind"] == config["kind"] and row["classes"] == len(config["classes"]) and row["description"]
        if "test_accuracy" in training:
            assert row["figure"].startswith(f"{100 * training['test_accuracy']:.2f}% test accuracy")
        else:
            assert row["figure"] == f"held-out KL {training['held_out_kl']:.3f}"
        weights = PRETRAINED / name.split(":")[1] / "model.safetensors"
        assert abs(row["size_mb"] - weights.stat().st_size / 1e6) < 0.06
    assert rows["vitlens:fashion-vit-pm"]["base"] == "vitlens:fashion-vit"
    code, table, _ = run_cli(["models"], capsys)
    assert code == 0 and "86.96% test accuracy" in table and "held-out KL 0.012" in table


def test_every_shipped_file_is_package_data():
    """The wheel carries what pyproject's package-data names: every file of every shipped model."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["vitlens.pretrained"]
    for folder in PRETRAINED.iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            for file in folder.iterdir():
                assert any(file.relative_to(PRETRAINED).match(p) for p in patterns), f"{file} is not shipped"


def test_version_is_single_sourced():
    import vitlens

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vitlens._version.__version__"}
    assert vitlens.__version__ == importlib.import_module("vitlens._version").__version__
    code = python("from vitlens.cli import main; main(['--version'])")
    assert code.stdout.strip() == f"vitlens {vitlens.__version__}"


# --- optional dependencies --------------------------------------------------------------------------------


def test_require_names_the_extra(monkeypatch):
    assert require("json", extra="none") is json
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    message = r"^hf:x needs transformers, which is not installed: pip install 'vitlens\[hf\]'$"
    with pytest.raises(VitlensError, match=message):
        require("transformers", extra="hf", what="hf:x")
    with pytest.raises(VitlensError, match=r"pip install 'vitlens\[hf\]'"):
        load_model("hf:google/vit-base-patch16-224")


def test_explain_overlays_and_report_need_no_matplotlib(tmp_path):
    """Without matplotlib: ``vitlens explain`` writes its overlays; the report's curves ask for the extra."""
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    proc = python(f"""
        import sys
        sys.modules["matplotlib"] = None
        from vitlens.cli import main
        code = main(["explain", {str(tmp_path / "a.png")!r}, "--model", "vitlens:counting-vit", "--method", "rollout",
                     "--out", {str(tmp_path / "out")!r}])
        assert code == 0, code
        from vitlens.viz.report import curves_figure
        try:
            curves_figure([])
        except Exception as e:
            print(type(e).__name__, e)
        """)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "out").rglob("*.png")), "no overlay written"
    assert "VitlensError the report's curves needs matplotlib" in proc.stdout and "vitlens[viz]" in proc.stdout


# --- colour maps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_embedded_colour_maps_equal_matplotlib(name):
    colormaps = pytest.importorskip("matplotlib").colormaps
    values = np.concatenate([np.linspace(0, 1, 1001), np.random.default_rng(0).random(1000), [0.0, 1.0, 0.5]])
    ours = apply_colormap(values, name)
    theirs = colormaps[name](values)[:, :3]
    assert ours.shape == (len(values), 3) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-7
    assert np.array_equal(apply_colormap(np.array([-3.0, np.nan, 7.0]), name), ours[[-3, -3, -2]])  # clamped


def test_unknown_colour_map_is_one_line():
    with pytest.raises(VitlensError, match=r"^unknown colour map 'jet' \(known: inferno, RdBu_r\)$"):
        colormap("jet")


# --- schedules fit the run -------------------------------------------------------------------------------


def test_warmup_fits_the_run():
    assert fit_warmup(100, 1000) == (100, None)
    assert fit_warmup(0, 1) == (0, None)
    steps, note = fit_warmup(100, 30)
    assert steps == 15 and note.startswith("note: --warmup-steps 100 does not fit a 30-step run") and "\n" not in note


def test_training_shortens_a_warmup_longer_than_the_run(tmp_path, capsys):
    argv = ["train", "classifier", "--data", "counting:train:n=64", "--eval-data", "counting:test:n=8",
            "--out", str(tmp_path / "run"), "--max-steps", "4", "--batch-size", "8"]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "note: --warmup-steps 100 does not fit a 4-step run; warming up over 2 steps" in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["training"]["config"]["warmup_steps"] == 2
