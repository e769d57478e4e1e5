"""The command line: explain end to end and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from conftest import run_cli as run


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(32, 32), (50, 70)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_explain_writes_maps_and_overlays(tiny_checkpoint, image_files, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(
        ["explain", *image_files, "--model", str(tiny_checkpoint), "--out", str(out_dir), "--json"], capsys
    )
    assert code == 0, err
    records = json.loads(out)
    assert [r["image"] for r in records] == image_files
    for r in records:
        m = np.load(r["map"])
        assert m.shape == (4, 4) and m.dtype == np.float32 and np.isfinite(m).all()
        assert Image.open(r["overlay"]).size[0] == 256
        assert 0 <= r["predicted"] < 5 and r["target"] == r["predicted"]
    assert not list(out_dir.glob(".*tmp"))


def test_explain_keeps_going_past_bad_files(tiny_checkpoint, image_files, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    args = ["explain", image_files[0], str(tmp_path / "missing.jpg"), str(bad), image_files[1]]
    code, out, err = run(
        [*args, "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--json", "--target", "3"], capsys
    )
    assert code == 2
    records = json.loads(out)
    assert [("error" in r) for r in records] == [True, True, False, False]  # errors reported as their batch is read
    assert {r["image"] for r in records if "error" not in r} == set(image_files)
    assert all(r["target"] == 3 for r in records if "error" not in r)
    lines = err.strip().splitlines()  # the bad files, reported at the end, then a count
    assert len(lines) == 3 and "missing.jpg" in lines[0] and "broken.png" in lines[1]
    assert "2 of 4 images could not be read" in lines[2]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "timm:no_such_vit?pretrained=0"], "unknown timm model"),
        (["--model", "timm:resnet18?pretrained=0"], "not a supported Vision Transformer"),
        (["--model", "/no/such/dir"], "no such checkpoint directory"),
        (["--method", "nope"], "unknown method 'nope' (known: "),
        (["--target", "7"], "target 7 out of range: the model has 5 classes"),
        (["--batch-size", "0"], "positive integer"),
    ],
)
def test_explain_user_errors(tiny_checkpoint, image_files, tmp_path, capsys, extra, message):
    args = ["explain", image_files[0], "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"), *extra]
    code, _, err = run(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "nope:train", "--out", "x"], "unknown data set 'nope'"),
        (["--data", "counting:train:grid=x", "--out", "x"], "bad value"),
        (["--data", "folder:/no/such:train", "--out", "x", "--arch", "fashion-vit"], "not a directory"),
        (["--data", "counting:train", "--out", "{tmp}/none", "--resume"], "no training checkpoint"),
        (["--data", "counting:train", "--out", "x", "--arch", "bogus"], "unknown architecture"),
    ],
)
def test_train_user_errors(args, message, tmp_path, capsys):
    code, _, err = run(["train", "classifier", *(a.replace("{tmp}", str(tmp_path)) for a in args)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_methods_and_info(tiny_checkpoint, capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0 and "rollout" in out and "Abnar" in out
    code, out, _ = run(["info", str(tiny_checkpoint)], capsys)
    assert code == 0 and json.loads(out)["grid"] == [4, 4]


def test_console_entry_points(tiny_checkpoint, image_files, tmp_path):
    for cmd in ([sys.executable, "-m", "vitlens"], [str(REPO / ".venv" / "bin" / "vitlens")]):
        if not (cmd[0] == sys.executable or (REPO / ".venv" / "bin" / "vitlens").exists()):
            continue
        proc = subprocess.run([*cmd, "explain", image_files[0], "--model", "nope:x"], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vitlens", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("vitlens ")


@pytest.mark.filterwarnings("always:method 'pm' on a model:UserWarning")
def test_warnings_are_one_line_on_the_command_line(tmp_path, capsys):
    from PIL import Image

    from conftest import committed, run_cli

    Image.new("RGB", (64, 64), (90, 40, 200)).save(tmp_path / "a.png")
    code, _, err = run_cli(["explain", str(tmp_path / "a.png"), "--model", committed("fashion-vit"), "--method", "pm",
                            "--out", str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 0
    line = next(line for line in err.splitlines() if "PM fine-tuned" in line)
    assert line.startswith("vitlens: warning: method 'pm' on a model that was not PM fine-tuned")
    assert ".py:" not in err and "get_explainer" not in err
