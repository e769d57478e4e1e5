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
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch

from conftest import committed, run_cli
from vitlens import pretrained
from vitlens.errors import VitlensError
from vitlens.metrics import evaluate
from vitlens.models.checkpoint import STATE, load_checkpoint, read_config

TRAIN = ["train", "classifier", "--data", "counting:train:n=32", "--eval-data", "counting:test:n=8",
         "--max-steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--checkpoint-every", "0",
         "--device", "cpu"]  # fmt: skip


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2, exactly one ``vitlens: error:`` line on stderr naming every needle, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and re.match(r"vitlens( [a-z]+)*: error: ", lines[0]), err  # ours or argparse's
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
    from vitlens.models.checkpoint import load_training_state

    out = copy_run(run_dir, tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, out / STATE)  # torch.save pickles the payload object
    set_config(out, training_state_sha256=sha256(out / STATE))
    torch.load(out / STATE, weights_only=False)  # the payload is live: an unsafe load runs it (here, on purpose)
    assert marker.exists()
    marker.unlink()
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
    shutil.copytree(pretrained.path(committed("counting-vit")), out)
    before = snapshot(out)
    code, _, err = run_cli([*TRAIN, "--out", str(out)], capsys)
    one_line_error(code, err, "already holds a model", "--overwrite")
    assert snapshot(out) == before


@pytest.mark.parametrize("finished", [True, False])
def test_overwrite_replaces_a_model_when_asked(run_dir, tmp_path, capsys, finished):
    out = tmp_path / "model"
    shutil.copytree(run_dir, out)
    if finished:  # a finished model without its training state
        (out / STATE).unlink()
        config = json.loads((out / "config.json").read_text())
        del config["training_state_sha256"]
        (out / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--max-steps", "1"], capsys)
    one_line_error(code, err, "already holds a model" if finished else "already holds a training run")
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
    [(["--lr", "0.5"], "lr 0.0003 → 0.5"), (["--batch-size", "4"], "batch_size 8 → 4"),
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
    shutil.copytree(pretrained.path(committed("counting-vit")), out)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(["info", str(out)], capsys)
    one_line_error(code, err, "corrupted")
    load_checkpoint(pretrained.path(committed("counting-vit")))  # the original still loads


# --- 4. bounds before allocation: 16-bit images, canvas cache ----------------------------------------------


def test_16_bit_images_are_resized_before_conversion(tmp_path):
    import tracemalloc

    import numpy as np
    from PIL import Image

    from vitlens.data.images import load_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65535, (2000, 3000)).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    tracemalloc.start()
    image = load_image(tmp_path / "deep.png", (48, 64))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8e6  # a float copy at full resolution alone would be 24 MB
    full = Image.fromarray(pixels.astype(np.float32) / 65535, mode="F").resize((64, 48), Image.Resampling.BILINEAR)
    assert image.shape == (3, 48, 64)
    assert torch.allclose(image[0], torch.from_numpy(np.array(full)), atol=1e-4)


def test_fashion_canvas_cache_is_bounded(monkeypatch):
    from vitlens.data import open_dataset
    from vitlens.data.fashion import FashionCanvas

    try:
        data = open_dataset("fashion-canvas:test:n=6,size=256")
    except VitlensError as e:
        pytest.skip(f"Fashion-MNIST not available ({e})")
    monkeypatch.setattr(FashionCanvas, "cache_bytes", 2 * (3 * 256 * 256 + 256 * 256 + 64))
    first = [data[i]["image"] for i in range(6)]
    assert len(data._cache) == 2 and data._cached <= FashionCanvas.cache_bytes
    assert all(torch.equal(a, data[i]["image"]) for i, a in enumerate(first))  # re-rendered samples are the same


# --- 7. ground truth and data checked -------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "birds"
    for k, name in enumerate("abcdefghij"):
        (root / "test" / name).mkdir(parents=True)
        Image.new("RGB", (40, 30), (20 * k, 90, 200)).save(root / "test" / name / "0.png")
    return root


@pytest.mark.parametrize(
    "line, needle",
    [("a/0.png,nan,nan,nan,nan", "not finite"), ("a/0.png,1,2,inf,9", "not finite"),
     ("a/0.png,10,2,5,9", "x0 <= x1"), ("a/0.png,-1,2,5,9", "non-negative"),
     ("zz/9.png,1,2,5,9", "names no image"), ("a/0.png,1,2,5", "expected")],
)  # fmt: skip
def test_bad_localization_lines_are_one_line(folder, capsys, line, needle):
    (folder / "test" / "localization.txt").write_text(f"a/0.png,1,1,5,5\n{line}\n")
    code, _, err = run_cli(["evaluate", "--model", str(committed("counting-vit")), "--methods", "rollout",
                            "--metrics", "pointing-game", "--data", f"folder:{folder}:test"], capsys)  # fmt: skip
    one_line_error(code, err, "localization.txt:2", needle)


def test_non_utf8_localization_is_one_line(folder, capsys):
    (folder / "test" / "localization.txt").write_bytes(b"a/0.png,1,1,5,5\n\xff\xfe,1,1,2,2\n")
    code, _, err = run_cli(["evaluate", "--model", str(committed("counting-vit")), "--methods", "rollout",
                            "--metrics", "pointing-game", "--data", f"folder:{folder}:test"], capsys)  # fmt: skip
    one_line_error(code, err, "localization.txt", "not UTF-8")


def test_box_outside_its_image_is_reported_not_scored(folder, capsys):
    (folder / "test" / "localization.txt").write_text("a/0.png,1,1,5,5\nb/0.png,10,10,400,20\n")
    args = ["evaluate", "--model", str(committed("counting-vit")), "--methods", "rollout", "--metrics",
            "pointing-game", "--data", f"folder:{folder}:test", "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert "localization.txt:2: box" in err and "outside b/0.png (40×30)" in err
    assert json.loads(out)["n"] == 9  # the sample with the bad box is left out, not scored as a miss


def test_folder_with_more_classes_than_the_model(folder, capsys):
    for name in ("k", "l"):
        (folder / "test" / name).mkdir()
        shutil.copy(folder / "test" / "a" / "0.png", folder / "test" / name / "0.png")
    code, _, err = run_cli(["evaluate", "--model", str(committed("counting-vit")), "--methods", "rollout",
                            "--metrics", "pointing-game", "--data", f"folder:{folder}:test"], capsys)  # fmt: skip
    one_line_error(code, err, "12 classes", "10 outputs")


# --- 8. names read from files and URIs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    out = tmp_path_factory.mktemp("hf") / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(out)
    return out


def test_hf_uri_options_are_allow_listed(hf_folder, capsys, monkeypatch):
    monkeypatch.delenv("VITLENS_TRUST_REMOTE_CODE", raising=False)
    code, _, err = run_cli(["info", f"hf:{hf_folder}?trust_remote_code=1"], capsys)
    one_line_error(code, err, "trust_remote_code not allowed", "VITLENS_TRUST_REMOTE_CODE=1")
    code, _, err = run_cli(["info", f"hf:{hf_folder}?code_revision=x"], capsys)
    one_line_error(code, err, "code_revision not allowed")
    code, out, err = run_cli(["info", f"hf:{hf_folder}?local_files_only=1"], capsys)
    assert code == 0, err


def test_trust_remote_code_only_through_the_environment(hf_folder, monkeypatch):
    import transformers

    from vitlens.models import load_model

    seen = []
    real = transformers.AutoModelForImageClassification.from_pretrained

    def spy(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(name, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", spy)
    monkeypatch.delenv("VITLENS_TRUST_REMOTE_CODE", raising=False)
    load_model(f"hf:{hf_folder}")
    monkeypatch.setenv("VITLENS_TRUST_REMOTE_CODE", "1")
    load_model(f"hf:{hf_folder}")
    assert seen == [False, True]


def test_hf_folder_with_a_pickle_is_one_line(hf_folder, tmp_path, capsys):
    out = tmp_path / "vit"
    shutil.copytree(hf_folder, out)
    (out / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, out / "pytorch_model.bin")
    code, _, err = run_cli(["info", f"hf:{out}"], capsys)
    one_line_error(code, err, "could not load")
    assert not marker.exists()


# --- 9, 10. NaN and the one-line promise ---------------------------------------------------------------------


def test_json_output_never_holds_nan():
    from vitlens.cli import finite_json

    text = finite_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": 0.5})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 0.5}


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image

    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "a.png")
    return tmp_path / "a.png"


@pytest.mark.parametrize(
    "args, needle",
    [(["explain", "{img}", "--model", ""], "empty model"),
     (["explain", "{img}", "--model", "."], "not a vitlens checkpoint"),
     (["info", "/"], "not a vitlens checkpoint"),
     (["explain", "{img}", "--model", "{ck}", "--out", ""], "empty"),
     (["explain", "{img}", "--model", "timm:vit_tiny_patch16_224?pretrained=0&num_classes=0&img_size=32"],
      "no classifier head"),
     (["evaluate", "--model", "{ck}", "--methods", "rollout", "--metrics", "deletion", "--data", "counting:test:n=4",
       "--option", "deletion.steps=nan"], "not a finite number"),
     (["evaluate", "--model", "{ck}", "--methods", "rollout", "--metrics", "deletion", "--data", "counting:test:n=4",
       "--option", "deletion.steps=4", "--option", "deletion.steps=5"], "given twice"),
     (["evaluate", "--model", "{ck}", "--methods", "rollout", "--data", "counting:test:n=5,n=6"], "given twice"),
     (["explain", "{img}", "--model", "{ck}", "--option", "n=1", "--option", "n=2"], "given twice"),
     (["report", "{tmp}/none.json", "--out", ""], "report output")],
)  # fmt: skip
def test_former_tracebacks_are_one_line(image, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    fill = {"img": str(image), "ck": str(committed("counting-vit")), "tmp": str(tmp_path)}
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli([a.format(**fill) for a in args], capsys)
    one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written into the current folder


def test_newline_in_a_file_name_stays_on_one_line(tmp_path, capsys):
    bad = tmp_path / "two\nlines.png"
    bad.write_bytes(b"not an image")
    code, _, err = run_cli(["explain", str(bad), "--model", str(committed("counting-vit")),
                            "--out", str(tmp_path / "out")], capsys)  # fmt: skip
    one_line_error(code, err, "two\\nlines.png")


def test_stale_temporary_files_are_taken_over(tmp_path):
    from vitlens.io import atomic_write_text

    target = tmp_path / "result.json"
    stale = tmp_path / ".result.json.tmp"
    stale.write_text("half of a file written before a kill -9")
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_live_writer_keeps_its_temporary_file(tmp_path):
    from vitlens.io import atomic_write_text

    held = tmp_path / ".result.json.tmp"
    fd = os.open(held, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process in the middle of writing
        os.write(fd, b"in progress")
        atomic_write_text(tmp_path / "result.json", "{}\n")
        assert held.read_bytes() == b"in progress"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".result.json.tmp", "result.json"]
    finally:
        os.close(fd)


def test_data_of_another_input_size_is_refused(tmp_path, capsys):
    args = ["train", "classifier", "--data", "counting:train:n=16,grid=3,cell=8", "--init",
            str(committed("counting-vit")), "--max-steps", "1", "--batch-size", "4", "--device", "cpu",
            "--out", str(tmp_path / "run")]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "(24, 24) pixels", "(48, 48)")


def test_outputs_never_replace_files_of_another_kind(results_file, tmp_path, capsys):
    model = tmp_path / "cv"
    shutil.copytree(pretrained.path(committed("counting-vit")), model)
    before = snapshot(model)
    code, _, err = run_cli(["evaluate", "--model", str(model), "--methods", "rollout", "--metrics", "pointing-game",
                            "--data", "counting:test:n=2", "--out", str(model / "config.json")], capsys)  # fmt: skip
    one_line_error(code, err, "is not a vitlens results file")
    code, _, err = run_cli(["report", str(results_file), "--out", str(model / "config.json")], capsys)
    one_line_error(code, err, "is not an HTML page")
    assert snapshot(model) == before
    code, _, err = run_cli(["report", str(results_file), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["report", str(results_file), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 0, err  # a report replaces a report


def test_checkpoint_kwargs_never_point_at_other_files(tiny_checkpoint, tmp_path, capsys):
    path = ckpt_copy(tiny_checkpoint, tmp_path, model__kwargs__checkpoint_path=str(tmp_path / "evil.pth"))
    code, _, err = run_cli(["info", str(path)], capsys)
    one_line_error(code, err, "model.kwargs.checkpoint_path")


def test_deeply_nested_json_is_one_line(tiny_checkpoint, results_file, tmp_path, capsys):
    path = ckpt_copy(tiny_checkpoint, tmp_path)
    (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(["info", str(path)], capsys)
    one_line_error(code, err, "not valid JSON")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(["report", str(deep), "--out", str(tmp_path / "r.html")], capsys)
    one_line_error(code, err, "cannot read results file")


def test_hostile_metrics_log_on_resume(run_dir, tmp_path, capsys):
    out = copy_run(run_dir, tmp_path)
    state = torch.load(out / STATE, weights_only=True)
    state["step"] = 2
    torch.save(state, out / STATE)
    set_config(out, training_state_sha256=sha256(out / STATE))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"step": "x"}\n"text"\n{"step": 1, "loss": 1.0}\n\xff\n')
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(s, int) for s in steps) and steps[-1] == 3


# --- fuzzing: results files, checkpoint configs, localization.txt, data specs ---------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
EXAMPLES = int(os.environ.get("VITLENS_FUZZ_EXAMPLES", "25"))  # more, at random, for a longer search
FUZZ = hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES == 25,
                           suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def paths_of(obj, prefix=()) -> list[tuple]:
    """Every path into a JSON value (keys and list indices), the value itself first."""
    found = [prefix]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        found += paths_of(v, (*prefix, k))
    return found


def mutated(obj, path: tuple, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    target = obj
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return obj


def cli_is_clean(code, err) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), err
    if code == 2:
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


def test_fuzz_results_files(results_file, tmp_path_factory):
    from vitlens.cli import main

    original = json.loads(results_file.read_text())
    small = dict(original, gallery=None, per_image={})  # the paths into the gallery are fuzzed separately
    candidates = [p for p in paths_of(original) if not (len(p) > 2 and p[0] in ("per_image",))]

    @FUZZ
    @hypothesis.given(st.sampled_from(candidates), JSON, st.booleans())
    def run(path, value, keep_gallery):
        folder = tmp_path_factory.mktemp("fuzz")
        data = mutated(original if keep_gallery or (path and path[0] == "gallery") else small, path, value)
        file = folder / "r.json"
        file.write_text(json.dumps(data))
        before = file.read_bytes()
        with _captured() as err:
            code = main(["report", str(file), "--out", str(folder / "out" / "r.html")])
        cli_is_clean(code, err.getvalue())
        assert file.read_bytes() == before
        assert sorted(p.name for p in folder.iterdir()) in (["r.json"], ["out", "r.json"])

    run()


def test_fuzz_checkpoint_configs(tiny_checkpoint, tmp_path_factory):
    from vitlens.cli import main

    original = json.loads((tiny_checkpoint / "config.json").read_text())

    @FUZZ
    @hypothesis.given(st.sampled_from(paths_of(original)), JSON)
    def run(path, value):
        folder = tmp_path_factory.mktemp("ck") / "ck"
        shutil.copytree(tiny_checkpoint, folder)
        (folder / "config.json").write_text(json.dumps(mutated(original, path, value)))
        before = snapshot(folder)
        with _captured() as err:
            code = main(["info", str(folder)])
        cli_is_clean(code, err.getvalue())
        assert snapshot(folder) == before

    run()


def test_fuzz_localization_files(tmp_path_factory):
    from PIL import Image

    from vitlens.data import open_dataset

    root = tmp_path_factory.mktemp("loc")
    for name in ("a", "b"):
        (root / "test" / name).mkdir(parents=True)
        Image.new("RGB", (20, 10)).save(root / "test" / name / "0.png")
    number = st.sampled_from(["0", "3", "9.5", "19", "25", "-1", "nan", "inf", "1e400", "", "x"])
    line = st.one_of(
        st.tuples(st.sampled_from(["a/0.png", "b/0.png", "c/0.png", ""]), number, number, number, number).map(",".join),
        st.text(max_size=30),
    )

    @FUZZ
    @hypothesis.given(st.lists(line, max_size=5), st.binary(max_size=8))
    def run(lines, noise):
        (root / "test" / "localization.txt").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + noise)
        try:
            data = open_dataset(f"folder:{root}:test", size=(16, 16))
        except VitlensError as e:
            assert "localization.txt" in str(e)
            return
        for i in range(len(data)):
            sample = data[i]
            if "error" in sample:
                assert "localization.txt:" in sample["error"]
            elif "boxes" in sample:
                b = sample["boxes"]
                assert torch.isfinite(b).all() and (b[:, :2] <= b[:, 2:]).all() and (b >= 0).all()

    run()


def test_fuzz_data_specs():
    from vitlens.data import parse_data_spec

    words = ["counting", "fashion-canvas", "folder", "test", "train", "n=3", "n=0", "n=-1", "seed=1", "grid=99",
             "grid=2", "size=4096", "size=64", "n=1,n=2", "x=1", "=", ",", "", "n=1e9"]  # fmt: skip
    part = st.sampled_from(words)

    @FUZZ
    @hypothesis.given(st.lists(part, min_size=1, max_size=4).map(":".join) | st.text(max_size=20))
    def run(spec):
        try:
            parsed = parse_data_spec(spec)
        except VitlensError:
            return
        if parsed.name in ("fashion-canvas", "fashion-grid"):
            assert 36 <= parsed.options.get("size", 64) <= 1024

    run()


class _captured:
    """Capture stderr around an in-process CLI call (hypothesis runs many inside one test)."""

    def __enter__(self):
        import contextlib
        import io

        self.buffer = io.StringIO()
        self._redirect = contextlib.redirect_stderr(self.buffer)
        self._out = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        self._out.__enter__()
        return self.buffer

    def __exit__(self, *exc):
        self._out.__exit__(*exc)
        self._redirect.__exit__(*exc)
        return False


def test_fifo_inputs_never_block(tmp_path, capsys):
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    code, _, err = run_cli(["report", str(fifo), "--out", str(tmp_path / "r.html")], capsys)
    one_line_error(code, err, "not a regular file")
    os.mkfifo(tmp_path / "a.png")
    code, _, err = run_cli(["explain", str(tmp_path / "a.png"), "--model", str(committed("counting-vit")),
                            "--out", str(tmp_path / "out")], capsys)  # fmt: skip
    one_line_error(code, err, "not a regular file")


def test_small_specs_never_ask_for_huge_images(capsys):
    code, _, err = run_cli(["evaluate", "--model", str(committed("counting-vit")), "--methods", "rollout",
                            "--data", "counting:test:grid=16,cell=1024"], capsys)  # fmt: skip
    one_line_error(code, err, "at most 2048")


def test_class_names_are_bounded(tiny_checkpoint, tmp_path, capsys):
    path = ckpt_copy(tiny_checkpoint, tmp_path, classes=["x" * 100_000] * 5)
    code, _, err = run_cli(["info", str(path)], capsys)
    one_line_error(code, err, "classes")


@pytest.mark.parametrize(
    "args, needle",
    [(["info", "timm:vit_tiny_patch16_224?pretrained=0&img_size=100000"], "img_size"),
     (["info", "timm:vit_tiny_patch16_224?pretrained=0&depth=100000"], "depth"),
     (["bench", "--model", "timm:vit_tiny_patch16_224?pretrained=0", "--image-size", "100000"], "1..4096")],
)  # fmt: skip
def test_small_commands_never_ask_for_huge_models(capsys, args, needle):
    t0 = time.time()
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, needle)
    assert time.time() - t0 < 20


def test_refused_training_leaves_no_lock(tmp_path, capsys):
    args = [*TRAIN, "--out", str(tmp_path / "run"), "--arch", "nonexistent"]
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "unknown architecture")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
