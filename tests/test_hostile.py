"""Hostile files, reused folders and interrupted runs: nothing executes, nothing is destroyed, one line.

Every case runs the CLI in-process and checks the exit status 2 with one ``vitlens: error:`` line (never
a traceback), and that nothing outside ``--out`` changed.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch

from conftest import committed, run_cli
from vitlens.checkpoint import STATE, load_checkpoint, read_config
from vitlens.errors import VitlensError
from vitlens.metrics import evaluate

TRAIN = ["train", "classifier", "--data", "counting:train:n=32", "--eval-data", "counting:test:n=8",
         "--max-steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--checkpoint-every", "0",
         "--device", "cpu"]  # fmt: skip


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2, exactly one ``vitlens: error:`` line on stderr naming every needle, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("vitlens: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def set_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 3-step training run (classifier on counting data) with its training state."""
    out = tmp_path_factory.mktemp("train") / "run"
    code = run_cli_plain([*TRAIN, "--out", str(out)])
    assert code == 0 and (out / STATE).is_file()
    return out


def run_cli_plain(args: list[str]) -> int:
    from vitlens.cli import main

    try:
        return main(args)
    except SystemExit as e:
        return int(e.code)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


# --- 1. nothing executes on --resume -------------------------------------------------------------------


class Payload:
    """A pickle that runs a shell command when loaded (what an attacker would put in training_state.pt)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_package_never_loads_pickles():
    sources = (Path(__file__).resolve().parents[1] / "src" / "vitlens").rglob("*.py")
    for file in sources:
        text = file.read_text()
        assert "weights_only=False" not in text, file
        assert "pickle.load" not in text, file
        for i, line in enumerate(text.splitlines()):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{file}:{i + 1}"


@pytest.mark.parametrize("rehash", [False, True], ids=["hash-mismatch", "hash-updated"])
def test_malicious_training_state_never_executes(run_dir, tmp_path, capsys, rehash):
    out = copy_run(run_dir, tmp_path)
    marker = tmp_path / "PWNED"
    with open(out / STATE, "wb") as f:
        pickle.dump({"kind": "classifier", "step": 1, "total": 3, "evil": Payload(marker)}, f)
    if rehash:  # an attacker who controls the folder also rewrites the recorded hash
        set_config(out, training_state_sha256=sha256(out / STATE))
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--resume"], capsys)
    one_line_error(code, err, STATE)
    assert not marker.exists()


def test_malicious_state_refused_by_the_library_too(run_dir, tmp_path):
    from vitlens.checkpoint import load_training_state

    out = copy_run(run_dir, tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, out / STATE)  # torch.save pickles the payload object
    set_config(out, training_state_sha256=sha256(out / STATE))
    with pytest.raises(VitlensError, match="not a vitlens training state"):
        load_training_state(out)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no-hash", "missing", "not-a-state"])
def test_damaged_training_state_is_one_line(run_dir, tmp_path, capsys, damage):
    out = copy_run(run_dir, tmp_path)
    data = (out / STATE).read_bytes()
    if damage == "truncated":
        (out / STATE).write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        (out / STATE).write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "no-hash":
        config = json.loads((out / "config.json").read_text())
        del config["training_state_sha256"]
        (out / "config.json").write_text(json.dumps(config))
    elif damage == "missing":
        (out / STATE).unlink()
    else:  # a valid weights-only file that is not a training state
        torch.save({"kind": "classifier", "step": "three"}, out / STATE)
        set_config(out, training_state_sha256=sha256(out / STATE))
    before = snapshot(out)
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--resume"], capsys)
    one_line_error(code, err)
    assert snapshot(out) == before


def test_state_hash_is_recorded_and_resume_still_works(run_dir, tmp_path, capsys):
    out = copy_run(run_dir, tmp_path)
    assert read_config(out)["training_state_sha256"] == sha256(out / STATE)
    state = torch.load(out / STATE, weights_only=True)
    state["step"] = 2  # a run cut at step 2 of 3 (the hash follows, as a writer's would)
    torch.save(state, out / STATE)
    set_config(out, training_state_sha256=sha256(out / STATE))
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert read_config(out)["training"]["step"] == 3


# --- 3. a trained model is never destroyed --------------------------------------------------------------


def test_training_into_a_finished_model_is_refused(tmp_path, capsys):
    out = tmp_path / "counting-vit"
    shutil.copytree(committed("counting-vit"), out)
    before = snapshot(out)
    code, _, err = run_cli([*TRAIN, "--out", str(out)], capsys)
    one_line_error(code, err, "already holds a model", "--overwrite")
    assert snapshot(out) == before


def test_overwrite_replaces_a_model_when_asked(run_dir, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(run_dir, out)
    (out / STATE).unlink()  # a finished model without its training state
    config = json.loads((out / "config.json").read_text())
    del config["training_state_sha256"]
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--overwrite", "--max-steps", "1"], capsys)
    assert code == 0, err
    assert read_config(out)["training"]["step"] == 1
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--overwrite", "--resume"], capsys)
    one_line_error(code, err, "--resume and --overwrite")


def test_folder_with_other_files_is_never_a_training_out(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not really")
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--overwrite"], capsys)
    one_line_error(code, err, "holds other files")
    assert (out / "holiday.jpg").read_bytes() == b"not really"


def test_a_second_training_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running training holds
        code, _, err = run_cli([*TRAIN, "--out", str(out)], capsys)
        one_line_error(code, err, "another training is writing")
        assert not out.exists()
    finally:
        os.close(fd)
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--max-steps", "1"], capsys)  # released: it runs
    assert code == 0, err
    assert not lock.exists()  # the run removed its lock when done


@pytest.mark.parametrize("out", [".", "", "..", "/proc/nope"])
def test_unusable_training_out_is_one_line(out, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([*TRAIN, "--out", out], capsys)
    one_line_error(code, err)
    assert sorted(tmp_path.iterdir()) == []


# --- 6. --resume continues the same run -----------------------------------------------------------------


@pytest.mark.parametrize(
    "change, named",
    [(["--lr", "0.5"], "lr 0.001 → 0.5"), (["--batch-size", "4"], "batch_size 8 → 4"),
     (["--max-steps", "9"], "max_steps 3 → 9"), (["--seed", "3"], "seed 0 → 3")],
)  # fmt: skip
def test_resume_refuses_changed_settings(run_dir, tmp_path, capsys, change, named):
    out = copy_run(run_dir, tmp_path)
    before = snapshot(out)
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--resume", *change], capsys)
    one_line_error(code, err, "settings differ", named)
    assert snapshot(out) == before


def test_resume_refuses_other_data(run_dir, tmp_path, capsys):
    out = copy_run(run_dir, tmp_path)
    args = [*TRAIN, "--out", str(out), "--resume"]
    args[args.index("counting:train:n=32")] = "fashion-canvas:train:n=32"
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "was trained on --data counting:train:n=32")


def test_training_on_data_that_does_not_fit_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "classifier", "--data", "counting:train:n=16,grid=4", "--init", str(committed("counting-vit")),
            "--max-steps", "1", "--batch-size", "4", "--device", "cpu", "--out", str(out)]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "17 classes", "10 outputs")


# --- 2. the report: schema, escaping, picture sizes --------------------------------------------------------


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results") / "r.json"
    evaluate(committed("counting-vit"), "rollout", "pointing-game,deletion", "counting:test", limit=4, batch_size=4,
             out=out, progress=False, gallery=2)  # fmt: skip
    return out


def edited(results_file: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(results_file.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


XSS = "<img src=x onerror=alert(1)>"


def test_report_escapes_every_value(results_file, tmp_path, capsys):
    def inject(d):
        d["gallery"]["index"][0] = XSS
        d["n"] = XSS
        d["used"] = {k: XSS for k in d["used"]}
        d["data"] = XSS
        d["classes"][0] = XSS

    path = edited(results_file, tmp_path, inject)
    code, _, err = run_cli(["report", str(path), "--out", str(tmp_path / "r.html")], capsys)
    one_line_error(code, err)  # index, n and used must be integers: refused before any HTML is written
    assert not (tmp_path / "r.html").exists()

    def strings_only(d):  # fields that may be any string: escaped
        d["data"] = XSS
        d["model"] = XSS
        d["classes"] = [XSS] * len(d["classes"])
        d["device"] = XSS
        d["results"] = {XSS: next(iter(d["results"].values()))}

    path = edited(results_file, tmp_path, strings_only)
    code, _, err = run_cli(["report", str(path), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "<img src=x" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


@pytest.mark.parametrize(
    "field, value",
    [("n", "5"), ("n", -1), ("used", {"pointing-game": "4"}), ("used", []), ("results", {"rollout": [1]}),
     ("results", {"rollout": {"pointing-game": "high"}}), ("gallery", {"index": "0"}), ("classes", "abc"),
     ("gallery.index", [0.5, 1]), ("gallery.probability", ["x", 1]), ("gallery.maps", {"rollout": [[[1, 2], [3]]]}),
     ("gallery.boxes", [[[1, 2, 3]], []]), ("gallery.image", [1, 2]), ("cost", {"methods": {"rollout": 3}}),
     ("curves", {"rollout": {"deletion": {"fraction": [0, 1], "probability": [1]}}}), ("accuracy", "0.5"),
     ("gallery.label", [True, 0])],
)  # fmt: skip
def test_report_refuses_wrong_types_in_one_line(results_file, tmp_path, capsys, field, value):
    def edit(d):
        *parents, last = field.split(".")
        target = d
        for p in parents:
            target = target[p]
        target[last] = value

    path = edited(results_file, tmp_path, edit)
    code, _, err = run_cli(["report", str(path), "--out", str(tmp_path / "r.html")], capsys)
    one_line_error(code, err, field.split(".")[0])
    assert not (tmp_path / "r.html").exists()


def png_header(width: int, height: int) -> str:
    """A PNG that claims ``width × height`` pixels in its header (and holds almost no data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def test_report_refuses_huge_pictures_before_decoding(results_file, tmp_path, capsys):
    def bomb(d):
        d["gallery"]["image"][0] = png_header(20000, 20000)

    path = edited(results_file, tmp_path, bomb)
    t0 = time.time()
    code, _, err = run_cli(["report", str(path), "--out", str(tmp_path / "r.html")], capsys)
    one_line_error(code, err, "picture too large", "20000×20000")
    assert time.time() - t0 < 10

    def garbage(d):
        d["gallery"]["image"][1] = base64.b64encode(b"GIF89a....").decode()

    code, _, err = run_cli(["report", str(edited(results_file, tmp_path, garbage)), "--out", str(tmp_path / "r.html")],
                           capsys)  # fmt: skip
    one_line_error(code, err, "not a base64 PNG")


def test_report_out_is_checked_before_the_work(results_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["report", str(results_file), "--out", str(blocker / "r.html")], capsys)
    one_line_error(code, err, "report output")


def test_report_still_reads_real_results(results_file, tmp_path, capsys):
    code, _, err = run_cli(["report", str(results_file), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 0, err


# --- 4, 5, 8, 9: checkpoint configs ---------------------------------------------------------------------


def test_every_committed_checkpoint_records_its_hash():
    for config in sorted((Path(__file__).resolve().parents[1] / "checkpoints").glob("*/config.json")):
        recorded = json.loads(config.read_text()).get("weights_sha256")
        assert recorded == sha256(config.parent / "model.safetensors"), config


def ckpt_copy(tiny_checkpoint: Path, tmp_path: Path, **model_edits) -> Path:
    out = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in model_edits.items():
        target = config
        *parents, last = key.split("__")
        for p in parents:
            target = target[p]
        if value is None:
            del target[last]
        else:
            target[last] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "edit, needle",
    [({"weights_sha256": None}, "missing 'weights_sha256'"),
     ({"model__kwargs__depth": 3000}, "model.kwargs.depth"),
     ({"model__kwargs__embed_dim": 10**7}, "model.kwargs.embed_dim"),
     ({"model__kwargs__depth": 40}, "do not match the architecture"),
     ({"preprocessing__input_size": [100000, 32]}, "input_size"),
     ({"preprocessing__std": [1e-300, 0.5, 0.5]}, "preprocessing.std"),
     ({"model__source": "hf", "model__name": "AutoModel", "model__config": {"model_type": "vit"}},
      "unsupported Hugging Face class"),
     ({"model__source": "hf", "model__name": "ViTForImageClassification", "model__config": {"model_type": "bert"}},
      "model_type"),
     ({"classes": ["x"] * 200_000}, "classes")],
)  # fmt: skip
def test_hostile_checkpoint_configs_are_one_line(tiny_checkpoint, tmp_path, capsys, edit, needle):
    path = ckpt_copy(tiny_checkpoint, tmp_path, **edit)
    t0 = time.time()
    code, _, err = run_cli(["info", str(path)], capsys)
    one_line_error(code, err, needle)
    assert time.time() - t0 < 20


def test_hf_config_naming_an_unbuildable_class_is_one_line(tiny_checkpoint, tmp_path, capsys):
    path = ckpt_copy(tiny_checkpoint, tmp_path, model__source="hf", model__name="ViTForImageClassification",
                     model__config={"model_type": "vit", "hidden_size": 30, "num_attention_heads": 4})  # fmt: skip
    code, _, err = run_cli(["info", str(path)], capsys)
    one_line_error(code, err)


def test_flipped_byte_in_committed_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "cv"
    shutil.copytree(committed("counting-vit"), out)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(["info", str(out)], capsys)
    one_line_error(code, err, "corrupted")
    load_checkpoint(committed("counting-vit"))  # the original still loads
