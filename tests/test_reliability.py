"""Reliability: every user mistake through the CLI is one line and exit status 2; training survives
``kill -9``; ``explain`` and folder ``evaluate`` stream past bad files and report them at the end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_cli
from vitlens import VitlensError
from vitlens.models.checkpoint import STATE, WEIGHTS, load_checkpoint, read_config, save_checkpoint


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    """Paths the error cases refer to (``{name}`` in their arguments)."""
    d = tmp_path_factory.mktemp("reliability")
    img = d / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    (d / "notes.png").write_text("these are notes, not pixels\n")
    (d / "cut.png").write_bytes(img.read_bytes()[:60])  # a PNG whose pixel data is cut off
    nan = np.zeros((8, 8), dtype=np.float32)
    nan[3, 3] = np.nan
    Image.fromarray(nan, "F").save(d / "nan.tiff")
    (d / "empty").mkdir()
    (d / "plain.txt").write_text("a file where a folder is expected\n")
    (d / "results.json").write_text("{}")
    (d / "outdir").mkdir()
    bb = load_checkpoint(tiny_checkpoint)
    run = save_checkpoint(d / "run", bb, state={"kind": "classifier", "step": 1, "total": 2})  # a classifier run
    corrupt = d / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    (corrupt / WEIGHTS).write_bytes((corrupt / WEIGHTS).read_bytes()[:100])
    return {"ck": str(tiny_checkpoint), "img": str(img), "d": str(d), "run": str(run), "corrupt": str(corrupt)}


@pytest.fixture(scope="module")
def hf_resnet(env) -> str:
    """A local Hugging Face image classifier that is not a ViT."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3)
    path = os.path.join(env["d"], "hf-resnet")
    transformers.ResNetForImageClassification(config).save_pretrained(path)
    return path


@dataclass
class Case:
    id: str
    args: list[str]
    message: str  # must appear in the one line on stderr


EXPLAIN = ["explain", "{img}", "--model", "{ck}", "--out", "{d}/out"]
EVAL = ["evaluate", "--model", "{ck}", "--methods", "rollout", "--metrics", "deletion"]
COUNTING = "counting:test:grid=2,n=4"
TRAIN = ["train", "classifier", "--out", "{d}/t", "--max-steps", "1"]

CASES = [
    # explain: names, models, paths, files, values
    Case("explain-method", [*EXPLAIN, "--method", "nope"], "unknown method 'nope' (known: attention, "),
    Case("explain-model-scheme", [*EXPLAIN, "--model", "nope:x"], "unknown model 'nope:x': expected timm:NAME"),
    Case("explain-timm-name", [*EXPLAIN, "--model", "timm:no_such_vit?pretrained=0"], "unknown timm model"),
    Case("explain-not-vit-timm", [*EXPLAIN, "--model", "timm:resnet18?pretrained=0"],
         "ResNet is not a supported Vision Transformer (supported: timm VisionTransformer"),
    Case("explain-not-vit-torchvision", [*EXPLAIN, "--model", "torchvision:resnet18?pretrained=0"],
         "ResNet is not a supported Vision Transformer"),
    Case("explain-missing-checkpoint", [*EXPLAIN, "--model", "{d}/no/such"], "no such checkpoint directory"),
    Case("explain-model-is-file", [*EXPLAIN, "--model", "{d}/plain.txt"], "is a file, not a model"),
    Case("explain-uri-flag", [*EXPLAIN, "--model", "timm:vit_tiny_patch16_224?pretrained=maybe"],
         "pretrained=maybe in model URI"),
    Case("explain-uri-kwarg", [*EXPLAIN, "--model", "timm:vit_tiny_patch16_224?pretrained=0&bogus=1"],
         "unexpected keyword argument 'bogus'"),
    Case("explain-missing-image", ["explain", "{d}/missing.jpg", "--model", "{ck}", "--out", "{d}/out"],
         "missing.jpg: no such file"),
    Case("explain-not-an-image", ["explain", "{d}/notes.png", "--model", "{ck}", "--out", "{d}/out"],
         "notes.png: not an image (PIL cannot identify it)"),
    Case("explain-undecodable", ["explain", "{d}/cut.png", "--model", "{ck}", "--out", "{d}/out"],
         "cut.png: cannot decode image"),
    Case("explain-nan-image", ["explain", "{d}/nan.tiff", "--model", "{ck}", "--out", "{d}/out"],
         "nan.tiff: image contains NaN or Inf values"),
    Case("explain-empty-folder", ["explain", "{d}/empty", "--model", "{ck}", "--out", "{d}/out"],
         "no image files in this folder (suffixes: .bmp"),
    Case("explain-out-is-file", [*EXPLAIN[:-1], "{d}/plain.txt"], "plain.txt exists and is not a directory"),
    Case("explain-target-high", [*EXPLAIN, "--target", "5"], "target 5 out of range: the model has 5 classes (0..4)"),
    Case("explain-target-negative", [*EXPLAIN, "--target", "-1"], "target -1 out of range"),
    Case("explain-batch-0", [*EXPLAIN, "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    Case("explain-option-form", [*EXPLAIN, "--option", "steps"], "bad --option 'steps': expected key=value"),
    Case("explain-option-name", [*EXPLAIN, "--option", "foo=1"], "rollout: unknown option(s) foo (known:"),
    Case("explain-wrong-kind", [*EXPLAIN, "--method", "diffmask"],
         "needs a DiffMask checkpoint (train one with `vitlens train diffmask`); this model is a classifier"),
    Case("explain-corrupt-checkpoint", [*EXPLAIN, "--model", "{corrupt}"], "is corrupted"),
    # evaluate: data specs, names, values, paths
    Case("eval-data-name", [*EVAL, "--data", "nope:test"], "unknown data set 'nope' in 'nope:test' (known: fashion"),
    Case("eval-data-value", [*EVAL, "--data", "counting:test:grid=x"], "bad value 'x' for grid"),
    Case("eval-data-option", [*EVAL, "--data", "counting:test:foo=1"], "unknown option 'foo' for counting (known: n,"),
    Case("eval-data-range", [*EVAL, "--data", "counting:test:n=0"], "n=0 out of range for counting (allowed: at least"),
    Case("eval-data-split", [*EVAL, "--data", "counting:dev"], "unknown split 'dev' in 'counting:dev' (known: train"),
    Case("eval-folder-missing", [*EVAL, "--data", "folder:{d}/no-data:test"],
         "is not a directory (expected ROOT/SPLIT/<class>/<image>)"),
    Case("eval-folder-root", [*EVAL, "--data", "folder"], "folder data needs a root"),
    Case("eval-metric", [*EVAL[:-1], "nope", "--data", COUNTING], "unknown metric 'nope' (known: "),
    Case("eval-method", ["evaluate", "--model", "{ck}", "--methods", "nope", "--data", COUNTING],
         "unknown method 'nope' (known: "),
    Case("eval-metric-applies", [*EVAL[:-1], "grid-pointing-game", "--data", COUNTING], "does not apply"),
    Case("eval-limit-0", [*EVAL, "--data", COUNTING, "--limit", "0"], "expected a positive integer, got '0'"),
    Case("eval-batch-0", [*EVAL, "--data", COUNTING, "--batch-size", "0"], "expected a positive integer"),
    Case("eval-out-dir", [*EVAL, "--data", COUNTING, "--out", "{d}/outdir"], "is a directory; give a file name"),
    Case("eval-device", [*EVAL, "--data", COUNTING, "--device", "bogus"], "unknown device 'bogus' (expected cpu"),
    Case("eval-option-form", [*EVAL, "--data", COUNTING, "--option", "steps=3"], "expected NAME.KEY=VALUE"),
    Case("eval-option-unused", [*EVAL, "--data", COUNTING, "--option", "insertion.steps=3"],
         "not among the chosen methods and metrics"),
    # train: specs, resume, kinds, values
    Case("train-data", [*TRAIN, "--data", "nope:train"], "unknown data set 'nope'"),
    Case("train-no-data", ["train", "classifier", "--out", "x"], "the following arguments are required: --data"),
    Case("train-resume-none", [*TRAIN, "--data", "counting:train", "--resume"], "--resume: no training checkpoint"),
    Case("train-arch", [*TRAIN, "--data", "counting:train", "--arch", "bogus"], "unknown architecture 'bogus'"),
    Case("train-lr", [*TRAIN, "--data", "counting:train", "--lr", "-1"], "--lr: expected a number > 0"),
    Case("train-epochs-nan", ["train", "classifier", "--out", "x", "--data", "counting:train", "--epochs", "nan"],
         "--epochs: expected a number > 0, got 'nan'"),
    Case("train-seed", [*TRAIN, "--data", "counting:train", "--seed", "-1"], "--seed: expected an integer >= 0"),
    Case("train-batch-0", [*TRAIN, "--data", "counting:train", "--batch-size", "0"], "expected a positive integer"),
    Case("train-out-file", ["train", "classifier", "--data", "counting:train", "--out", "{d}/plain.txt"],
         "plain.txt exists and is not a directory"),
    Case("train-device", [*TRAIN, "--data", "counting:train", "--device", "bogus"], "unknown device 'bogus'"),
    Case("train-init", [*TRAIN, "--data", "counting:train", "--init", "{d}/no/such"], "no such checkpoint directory"),
    Case("train-pm-resume-none", ["train", "pm", "--model", "{ck}", "--data", "counting:train", "--out", "{d}/p",
                                  "--resume"], "--resume: no training checkpoint"),  # fmt: skip
    Case("train-pm-not-vit", ["train", "pm", "--model", "timm:resnet18?pretrained=0", "--data", "counting:train",
                              "--out", "{d}/p"], "not a supported Vision Transformer"),  # fmt: skip
    Case("train-pm-wrong-kind", ["train", "pm", "--model", "{ck}", "--data", "counting:train", "--out", "{run}",
                                 "--resume"], "is a classifier checkpoint, but a pm checkpoint is needed"),  # fmt: skip
    Case("train-diffmask-wrong-kind", ["train", "diffmask", "--model", "{ck}", "--data", "counting:train", "--out",
                                       "{run}", "--resume"], "is a classifier checkpoint, but a diffmask checkpoint"),
    Case("train-diffmask-margin", ["train", "diffmask", "--model", "{ck}", "--data", "counting:train", "--out", "x",
                                   "--kl-margin", "-1"], "--kl-margin: expected a number > 0"),  # fmt: skip
    Case("train-bcos-arch", ["train", "bcos", "--data", "counting:train", "--out", "{d}/b", "--arch", "nope"],
         "unknown B-cos architecture 'nope' (known: "),
    Case("train-bcos-resume-none", ["train", "bcos", "--data", "counting:train", "--out", "{d}/b", "--resume"],
         "--resume: no training checkpoint"),
    # report, bench, demo, info, the command itself
    Case("report-missing", ["report", "{d}/missing.json", "--out", "{d}/r.html"], "missing.json"),
    Case("report-not-results", ["report", "{d}/results.json", "--out", "{d}/r.html"],
         "is not a `vitlens evaluate --out` results file"),
    Case("bench-method", ["bench", "--model", "{ck}", "--methods", "nope"], "unknown method(s) nope (known: "),
    Case("bench-device", ["bench", "--model", "{ck}", "--device", "bogus"], "unknown device 'bogus'"),
    Case("bench-image-size", ["bench", "--model", "{ck}", "--methods", "rollout", "--image-size", "33",
                              "--repeat", "1"], "--image-size 33: the model does not take 33 px inputs"),  # fmt: skip
    Case("bench-batch-0", ["bench", "--model", "{ck}", "--batch-size", "0"], "expected a positive integer"),
    Case("bench-not-vit", ["bench", "--model", "timm:resnet18?pretrained=0", "--methods", "rollout"],
         "not a supported Vision Transformer"),
    Case("demo-out-file", ["demo", "--out", "{d}/plain.txt"], "plain.txt exists and is not a directory"),
    Case("demo-n-0", ["demo", "-n", "0"], "expected a positive integer"),
    Case("info-model", ["info", "nope:x"], "unknown model 'nope:x'"),
    Case("command", ["nope"], "invalid choice: 'nope'"),
]  # fmt: skip


def assert_one_line(code: int, err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_mistake_is_one_line(case, env, capsys):
    args = [a.format(**env) for a in case.args]
    code, _, err = run_cli(args, capsys)
    assert_one_line(code, err, case.message)


def test_not_a_vit_from_hugging_face(env, hf_resnet, capsys):
    code, _, err = run_cli(["explain", env["img"], "--model", f"hf:{hf_resnet}", "--out", env["d"] + "/out"], capsys)
    assert_one_line(code, err, "ResNetForImageClassification is not a supported Vision Transformer")


def test_errors_through_the_console_script(env):
    """The same contract end to end in a fresh process (warnings and all)."""
    for args in (["explain", f"{env['d']}/cut.png", "--model", env["ck"], "--out", f"{env['d']}/out"],
                 ["evaluate", "--model", env["corrupt"], "--methods", "rollout", "--data", COUNTING]):  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "vitlens", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_explain_folder_keeps_going_and_reports_at_the_end(env, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, size in enumerate([(32, 32), (20, 50), (300, 200)]):  # non-square and larger than the model
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)).save(folder / "sub" / "rgba.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "readme.txt").write_text("skipped: not an image suffix")
    out = folder / "maps"  # inside the input folder: never read back as input
    for _ in range(2):
        code, stdout, err = run_cli(["explain", str(folder), "--model", env["ck"], "--out", str(out), "--json",
                                     "--batch-size", "2"], capsys)  # fmt: skip
        records = json.loads(stdout)
        assert code == 2 and len(records) == 5
    assert sorted(os.path.basename(r["image"]) for r in records if "error" not in r) == ["0.png", "1.png", "2.png",
                                                                                         "rgba.png"]  # fmt: skip
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "bad.jpg" in lines[0] and "1 of 5 images could not be read" in lines[1]
    assert len(list(out.rglob("*.npy"))) == 4 and not list(out.rglob(".*"))
    assert (out / "sub" / "rgba.rollout.npy").is_file()  # the input tree, mirrored


def test_evaluate_folder_reports_bad_files(env, tmp_path, capsys):
    root = tmp_path / "data"
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        (root / "test" / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(root / "test" / cls / f"{k}.png")
    (root / "test" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = ["evaluate", "--model", env["ck"], "--methods", "rollout", "--metrics", "deletion",
            "--data", f"folder:{root}:test", "--json", "--batch-size", "2", "--option", "deletion.steps=4",
            "--out", str(tmp_path / "res.json")]  # fmt: skip
    code, stdout, err = run_cli(args, capsys)
    summary = json.loads(stdout)
    assert code == 2 and summary["n"] == 4
    assert [os.path.basename(s["path"]) for s in summary["skipped"]] == ["broken.png"]
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("vitlens:")]
    assert len(lines) == 2 and "broken.png" in lines[0] and "1 samples could not be read" in lines[1]
    assert json.loads((tmp_path / "res.json").read_text())["skipped"] == summary["skipped"]


def test_atomic_write_keeps_the_old_file(tmp_path):
    from vitlens.io import atomic_write, atomic_write_json

    path = atomic_write_json(tmp_path / "results.json", {"n": 1})

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"n": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"n": 1} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_image_too_large_is_refused(tmp_path, monkeypatch):
    import vitlens.data.images as images

    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(VitlensError, match=r"big.png: image too large \(300×200 pixels"):
        images.load_image(tmp_path / "big.png", size=(32, 32))


_PEAK = """
import resource, sys
from vitlens.data import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = load_image(sys.argv[1], size=(224, 224) if sys.argv[2] == "small" else None)
print(x.shape[1], x.shape[2], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_large_photograph_memory_is_bounded(tmp_path):
    """A 48-megapixel JPEG (144 MB as 8-bit RGB, 576 MB as float) loads for a 224 px model in a few MB."""
    im = Image.linear_gradient("L").resize((8000, 6000)).convert("RGB")
    im.save(tmp_path / "photo.jpg", quality=90)
    del im
    grown = {}
    for how in ("small", "full"):  # the full decode shows that the measurement sees a large image
        proc = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "photo.jpg"), how], capture_output=True,
                              text=True, env=CHILD_ENV, timeout=300)  # fmt: skip
        h, w, grown[how] = map(int, proc.stdout.split())
    print(f"\npeak RSS growth loading an 8000x6000 JPEG: {grown['small']} MB at 224 px, {grown['full']} MB in full")
    assert (h, w) == (6000, 8000) and grown["full"] > 200 and grown["small"] < 40


# --- kill -9 and resume -----------------------------------------------------------------------------

TRAIN_ARGS = ["train", "classifier", "--data", "counting:train:grid=2,n=96", "--eval-data", "counting:test:grid=2,n=8",
              "--max-steps", "90", "--batch-size", "8", "--warmup-steps", "10", "--checkpoint-every", "0",
              "--device", "cpu", "--seed", "5"]  # fmt: skip
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train(out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vitlens", *TRAIN_ARGS, "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after_checkpoint(out, delay: float) -> int:
    """Start (or resume) training, SIGKILL it ``delay`` s after a new checkpoint appears; the step it reached."""
    try:
        before = read_config(out)["training"]["step"]
    except VitlensError:  # no checkpoint yet
        before = 0
    proc = _train(out, *(["--resume"] if before else []))
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if read_config(out)["training"]["step"] > before:
                break
        except Exception:  # not written yet (readers may race the writer's very first save)
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return read_config(out)["training"]["step"]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    full = _train(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()

    cut = tmp_path / "cut"
    steps = [_kill_after_checkpoint(cut, delay) for delay in (0.05, 0.4)]  # killed twice, at arbitrary moments
    assert 0 < steps[0] <= steps[1] < 90
    load_checkpoint(cut)  # the last complete checkpoint loads after each kill
    resumed = _train(cut, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    assert read_config(cut)["training"]["step"] == read_config(tmp_path / "full")["training"]["step"] == 90
    a, b = _weights(tmp_path / "full"), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [r["step"] for r in
                                                       map(json.loads, (tmp_path / "full" / "metrics.jsonl")
                                                           .read_text().splitlines()) if "loss" in r]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "full"]  # no temporaries left behind


def test_resume_after_kill_between_the_two_renames(tmp_path, capsys):
    """The narrowest window of a checkpoint swap: the old directory set aside, the new one not yet in place."""
    out = tmp_path / "run"
    code, _, err = run_cli([*TRAIN_ARGS[:7], "4", "--batch-size", "8", "--out", str(out)], capsys)
    assert code == 0, err
    state = torch.load(out / STATE, weights_only=True)
    state["step"] = 2  # pretend the run was cut at step 2 of 4 (the recorded hash follows, as a writer's) ...
    torch.save(state, out / STATE)
    config = json.loads((out / "config.json").read_text())
    config["training_state_sha256"] = hashlib.sha256((out / STATE).read_bytes()).hexdigest()
    (out / "config.json").write_text(json.dumps(config))
    os.replace(out, tmp_path / ".run.old")  # ... between the swap's two renames
    code, _, err = run_cli([*TRAIN_ARGS[:7], "4", "--batch-size", "8", "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert read_config(out)["training"]["step"] == 4 and not (tmp_path / ".run.old").exists()


# --- streaming 10,000 images ------------------------------------------------------------------------


def _explain_folder_rss(folder, out, model) -> tuple[int, int, int]:
    """(exit status, peak RSS in MB, records) of `vitlens explain FOLDER --json` in a fresh process."""
    with open(out.with_suffix(".json"), "w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitlens", "explain", str(folder), "--model", str(model), "--method", "attention",
             "--out", str(out), "--json", "--batch-size", "64"],
            env=CHILD_ENV, stdout=stdout, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    records = json.loads(out.with_suffix(".json").read_text())
    return proc.returncode, usage.ru_maxrss // 1024, len(records)


@pytest.mark.slow
def test_explain_streams_10000_images_with_flat_memory(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 24, 24, 3), dtype=np.uint8)
    folders = {n: tmp_path / f"in{n}" for n in (1000, 10000)}
    for n, folder in folders.items():
        folder.mkdir()
        for i in range(n):
            Image.fromarray(pixels[i % 64]).save(folder / f"{i:05d}.png", compress_level=0)
        for k in range(5):
            (folder / f"bad{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(k))
    results = {n: _explain_folder_rss(folder, tmp_path / f"out{n}", tiny_checkpoint) for n, folder in folders.items()}
    print(f"\npeak RSS: {results[1000][1]} MB for 1,000 images, {results[10000][1]} MB for 10,000 images")
    for n, (code, _, records) in results.items():
        assert code == 2 and records == n + 5  # every image answered; the 5 bad files make the status 2
        assert len(list((tmp_path / f"out{n}").glob("*.npy"))) == n
    assert results[10000][1] - results[1000][1] < 40  # MB: flat, not growing with the number of images
