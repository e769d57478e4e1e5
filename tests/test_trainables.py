"""One registration per trainable: the command line, the dispatch and the checkpoint reader follow it."""

from __future__ import annotations

import inspect
import json

import pytest

from vitlens.cli import build_parser, main
from vitlens.errors import VitlensError
from vitlens.models.checkpoint import load_checkpoint, save_checkpoint, validate_config
from vitlens.trainables import TRAINABLES, Trainable, option, register_trainable

calls: list[dict] = []


def toy_train(*, data, out, cfg, resume, overwrite, alpha, model):
    """A training function of a method registered by the tests only."""
    calls.append({"data": data, "out": out, "lr": cfg.lr, "alpha": alpha, "model": model, "resume": resume})
    return {"alpha_seen": alpha}


@pytest.fixture
def toy(monkeypatch):
    trainable = Trainable(
        "toy",
        "a toy method",
        f"{__name__}:toy_train",
        options=(option("--alpha", type=float, default=0.5, help="toy weight"), option("--model", required=True)),
        lr=0.01,
        config={"toy": (True, lambda v: isinstance(v, dict) and v.get("ok") is True, "an object with ok: true")},
    )
    monkeypatch.setitem(TRAINABLES, "toy", trainable)
    calls.clear()
    return trainable


@pytest.mark.parametrize("name", sorted(TRAINABLES))
def test_every_registered_function_takes_its_commands_options(name):
    trainable = TRAINABLES[name]
    signature = inspect.signature(trainable.training_function())
    keywords = ["data", "out", "cfg", "resume", "overwrite", *trainable.option_names()]
    signature.bind(**dict.fromkeys(keywords))  # raises TypeError when an option has no parameter
    help_text = build_parser()._subparsers._group_actions[0].choices["train"]
    commands = help_text._subparsers._group_actions[0].choices
    assert name in commands
    listed = " ".join(commands[name].format_help().split())
    for opt in trainable.options:
        assert opt.flags[0] in listed
    assert f"(default without --max-steps: {trainable.length})" in listed


def test_a_registration_is_a_command_and_a_checkpoint_kind(toy, tmp_path, tiny_checkpoint, capsys):
    assert main(["train", "toy", "--data", "shapes:train", "--out", str(tmp_path / "o"), "--model", "m",
                 "--alpha", "2"]) == 0  # fmt: skip
    assert calls == [{"data": "shapes:train", "out": str(tmp_path / "o"), "lr": 0.01, "alpha": 2.0, "model": "m",
                      "resume": False}]  # fmt: skip
    assert json.loads(capsys.readouterr().out)["alpha_seen"] == 2.0
    with pytest.raises(SystemExit) as refused:  # --model is required
        main(["train", "toy", "--data", "d", "--out", "o"])
    assert refused.value.code == 2 and "--model" in capsys.readouterr().err

    backbone = load_checkpoint(tiny_checkpoint)
    saved = save_checkpoint(tmp_path / "toy", backbone, kind="toy", extra_config={"toy": {"ok": True}})
    assert load_checkpoint(saved, kind="toy").config["kind"] == "toy"
    config = json.loads((saved / "config.json").read_text())
    with pytest.raises(VitlensError, match="invalid 'toy'"):
        validate_config({**config, "toy": {"ok": False}})


@pytest.mark.parametrize("kind", ["nope", ["pm"], {"a": 1}, 3])
def test_an_unregistered_kind_is_refused_in_one_line(tiny_checkpoint, kind):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(VitlensError, match="invalid 'kind'.*expected one of classifier, pm, diffmask, bcos"):
        validate_config({**config, "kind": kind})


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_trainable(Trainable("pm", "again", "vitlens.training.pm:train_pm"))
