"""Checkpoints that are damaged, mismatched or of the wrong kind are refused whole, with one clear error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PRETRAINED, committed
from vitlens import VitlensError, load_model
from vitlens.explainers.diffmask import DiffMaskGates
from vitlens.models.checkpoint import (
    CONFIG,
    FORMAT_VERSION,
    STATE,
    WEIGHTS,
    load_checkpoint,
    read_config,
    save_checkpoint,
)


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny classifier checkpoint, free to damage."""
    path = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, path)
    return path


def _config(path):
    return json.loads((path / CONFIG).read_text())


def _write_config(path, config):
    (path / CONFIG).write_text(json.dumps(config))


def _rewrite_tensors(path, change):
    """Apply ``change`` to the tensors and write them back with a matching hash (an intact file)."""
    tensors = dict(load_file(path / WEIGHTS))
    change(tensors)
    save_file(tensors, path / WEIGHTS)
    config = _config(path)
    config["weights_sha256"] = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    _write_config(path, config)


def _refused(path, match, **kw):
    with pytest.raises(VitlensError, match=match) as info:
        load_checkpoint(path, **kw)
    assert "\n" not in str(info.value)  # one line for the CLI
    return str(info.value)


def test_save_records_version_and_hash(ckpt):
    config = _config(ckpt)
    assert config["format_version"] == FORMAT_VERSION
    assert config["weights_sha256"] == hashlib.sha256((ckpt / WEIGHTS).read_bytes()).hexdigest()


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -100, -1])
def test_truncated_weights_are_refused(ckpt, keep):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[:keep] if keep >= 0 else data[:keep])
    _refused(ckpt, "corrupted")  # the recorded SHA-256 no longer matches
    config = _config(ckpt)
    config["weights_sha256"] = hashlib.sha256((ckpt / WEIGHTS).read_bytes()).hexdigest()  # a forged hash:
    _write_config(ckpt, config)  # safetensors itself must refuse the file
    message = _refused(ckpt, "truncated or corrupted")
    assert WEIGHTS in message


def test_flipped_bytes_in_the_data_are_caught_by_the_hash(ckpt):
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor: safetensors cannot notice
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    _refused(ckpt, "SHA-256 differs")


def test_garbage_weights_file(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"\xff" * 64)
    config = _config(ckpt)
    config["weights_sha256"] = hashlib.sha256(b"\xff" * 64).hexdigest()
    _write_config(ckpt, config)
    _refused(ckpt, "truncated or corrupted")


def test_missing_weights_file(ckpt):
    (ckpt / WEIGHTS).unlink()
    _refused(ckpt, f"missing {WEIGHTS}")


def test_missing_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("model.head.weight"))
    _refused(ckpt, r"missing: head\.weight")


def test_unexpected_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.update({"model.extra_layer.weight": torch.zeros(3)}))
    _refused(ckpt, r"unexpected: extra_layer\.weight")


def test_wrong_tensor_shape_is_refused_before_any_weight_is_assigned(ckpt, monkeypatch):
    _rewrite_tensors(ckpt, lambda t: t.update({"model.head.weight": torch.zeros(7, 32)}))
    calls = []
    original = torch.nn.Module.load_state_dict
    monkeypatch.setattr(
        torch.nn.Module, "load_state_dict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    message = _refused(ckpt, r"wrong shape")
    assert "head.weight [7, 32] vs [5, 32]" in message
    assert calls == []  # never half-loaded


def test_non_finite_weights(ckpt):
    def poison(t):
        t["model.head.bias"] = torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0])

    _rewrite_tensors(ckpt, poison)
    _refused(ckpt, "NaN or Inf")


def test_class_list_must_match_the_head(ckpt):
    config = _config(ckpt)
    config["classes"] = ["a", "b"]
    _write_config(ckpt, config)
    _refused(ckpt, "lists 2 classes, but the model has 5 outputs")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("kind"), "missing 'kind'"),
        (lambda c: c.update(kind="detector"), "invalid 'kind'.*one of classifier, pm, diffmask, bcos"),
        (lambda c: c.update(format="something-else"), "not a vitlens checkpoint"),
        (lambda c: c.pop("format"), "not a vitlens checkpoint"),
        (lambda c: c.update(format_version=FORMAT_VERSION + 1), "newer than this vitlens.*upgrade"),
        (lambda c: c.update(format_version="1"), "invalid 'format_version'"),
        (lambda c: c.update(format_version=True), "invalid 'format_version'"),
        (lambda c: c["model"].pop("source"), "missing 'model.source'"),
        (lambda c: c["model"].update(source="keras"), "invalid 'model.source'"),
        (lambda c: c.update(model="vit"), "invalid 'model'"),
        (lambda c: c["preprocessing"].update(input_size=[32]), "invalid 'preprocessing.input_size'"),
        (lambda c: c["preprocessing"].update(std=[0.5, 0.0, 0.5]), "invalid 'preprocessing.std'"),
        (lambda c: c["preprocessing"].update(mean=[0.5, 0.5]), "differ in length"),
        (lambda c: c.update(classes=[]), "invalid 'classes'"),
        (lambda c: c.update(classes=[1, 2, 3, 4, 5]), "invalid 'classes'"),
        (lambda c: c.update(weights_sha256="abc"), "invalid 'weights_sha256'"),
        (lambda c: c["model"].update(name="no_such_architecture"), "cannot build the model timm:no_such_architecture"),
        (lambda c: c["model"]["kwargs"].update(depth=3), "missing: blocks.2"),
    ],
)
def test_config_schema(ckpt, edit, match):
    config = _config(ckpt)
    edit(config)
    _write_config(ckpt, config)
    _refused(ckpt, match)


def test_config_not_json(ckpt):
    (ckpt / CONFIG).write_text('{"format": "vitlens-checkpoint", ')
    _refused(ckpt, "not valid JSON")
    (ckpt / CONFIG).write_text("[1, 2]")
    _refused(ckpt, "not a JSON object")


def test_missing_version_is_version_1(ckpt, images):
    config = _config(ckpt)
    del config["format_version"]  # as written by early vitlens
    _write_config(ckpt, config)
    assert read_config(ckpt)["format_version"] == 1
    assert load_checkpoint(ckpt)(images).shape == (3, 5)
    assert "format_version" not in _config(ckpt)  # loading never rewrites a checkpoint


def test_missing_hash_is_refused(ckpt):
    config = _config(ckpt)
    del config["weights_sha256"]  # deleting the field must not switch the check off
    _write_config(ckpt, config)
    _refused(ckpt, "missing 'weights_sha256'")


def test_wrong_kind(ckpt):
    _refused(ckpt, "is a classifier checkpoint, but a diffmask checkpoint is needed", kind="diffmask")
    _refused(ckpt, "is a classifier checkpoint, but a pm checkpoint is needed", kind="pm")


@pytest.fixture
def diffmask_ckpt(ckpt, tmp_path):
    """A DiffMask checkpoint on the tiny classifier (32-dim tokens, 2 blocks → 4 hidden states)."""
    bb = load_checkpoint(ckpt)
    gates = DiffMaskGates(32, 4)
    settings = {"dim": 32, "num_states": 4, "scale": 15.0, "offset": 8.0, "kl_margin": 0.1}
    extra = {f"gates.{k}": v for k, v in gates.state_dict().items()}
    return save_checkpoint(
        tmp_path / "dm", bb, kind="diffmask", extra_tensors=extra, extra_config={"diffmask": settings}
    )


def test_diffmask_checkpoint_round_trip(diffmask_ckpt, images):
    from vitlens import explain

    bb = load_checkpoint(diffmask_ckpt, kind="diffmask")
    assert explain(bb, images, "diffmask").maps.shape == (3, 4, 4)


def _refused_when_explaining(path, match, images):
    from vitlens import explain

    backbone = load_checkpoint(path, kind="diffmask")  # the model itself is intact
    with pytest.raises(VitlensError, match=match) as info:
        explain(backbone, images, "diffmask")
    assert "\n" not in str(info.value)
    assert str(path / WEIGHTS) in str(info.value)


def test_diffmask_gates_checked(diffmask_ckpt, images):
    _rewrite_tensors(diffmask_ckpt, lambda t: t.pop("extra.gates.placeholder"))
    _refused_when_explaining(
        diffmask_ckpt, r"DiffMask gates do not match the architecture; missing: placeholder", images
    )


def test_diffmask_gates_of_a_wrong_shape_are_refused_when_explaining(diffmask_ckpt, images):
    def widen(tensors):
        tensors["extra.gates.placeholder"] = torch.zeros(1, 48)

    _rewrite_tensors(diffmask_ckpt, widen)
    _refused_when_explaining(
        diffmask_ckpt,
        r"DiffMask gates do not match the architecture; wrong shape .*placeholder \[1, 48\] vs \[1, 32\]",
        images,
    )


def test_diffmask_gates_round_trip_through_a_saved_checkpoint(ckpt, tmp_path, images):
    from vitlens.explainers.diffmask import DiffMask

    bb = load_checkpoint(ckpt)
    torch.manual_seed(1)
    gates = DiffMaskGates.for_backbone(bb, scale=5.0, offset=1.0)
    with torch.no_grad():
        for p in gates.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the initialisation
    extra = {f"gates.{k}": v for k, v in gates.state_dict().items()}
    path = save_checkpoint(tmp_path / "rt", bb, kind="diffmask", extra_tensors=extra,
                           extra_config={"diffmask": {**gates.settings(), "kl_margin": 0.1}})  # fmt: skip
    loaded = DiffMaskGates.from_checkpoint(load_checkpoint(path, kind="diffmask"))
    assert loaded.settings() == {"dim": 32, "num_states": 4, "scale": 5.0, "offset": 1.0}
    assert not loaded.training
    for k, v in gates.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    expected = DiffMask(bb, gates)(images).maps
    got = DiffMask(load_checkpoint(path, kind="diffmask"))(images).maps
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.std() > 0  # the trained-looking gates give a non-constant map


def test_diffmask_config_checked(diffmask_ckpt):
    config = _config(diffmask_ckpt)
    config["diffmask"]["num_states"] = 6
    _write_config(diffmask_ckpt, config)
    _refused(diffmask_ckpt, r"'diffmask.num_states' is 6, but the model has 2 blocks")
    del config["diffmask"]
    _write_config(diffmask_ckpt, config)
    _refused(diffmask_ckpt, "missing 'diffmask'")


def test_failed_load_leaves_the_files_alone(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("model.head.weight"))
    before = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    _refused(ckpt, "missing")
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before


def test_interrupted_swap_readers_and_writers(ckpt, tmp_path):
    """A kill between the two renames: readers use the set-aside copy; the next writer puts it back."""
    bb = load_checkpoint(ckpt)
    path = tmp_path / "run"
    save_checkpoint(path, bb, state={"kind": "classifier", "step": 3})
    os.replace(path, tmp_path / ".run.old")
    (tmp_path / ".run.abcd1234.tmp").mkdir()  # the half-written next checkpoint
    assert load_model(path).classes == bb.classes  # a reader, no files moved
    assert not path.exists() and (tmp_path / ".run.old" / CONFIG).is_file()
    from vitlens.training.loop import check_resumable

    check_resumable(path)  # a writer about to resume: finishes the swap
    assert (path / STATE).is_file() and not (tmp_path / ".run.old").exists()
    assert not (tmp_path / ".run.abcd1234.tmp").exists()


def test_save_cut_short_keeps_the_previous_checkpoint(ckpt, tmp_path, monkeypatch):
    bb = load_checkpoint(ckpt)
    path = save_checkpoint(tmp_path / "run", bb, training={"step": 1})
    import vitlens.models.checkpoint as checkpoint

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, bb, training={"step": 2})
    assert read_config(path)["training"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "run"]  # no temporary left


def test_committed_checkpoints_load_unchanged():
    names = [p.name for p in PRETRAINED.iterdir() if (p / CONFIG).is_file()] if PRETRAINED.is_dir() else []
    if not names:
        committed("counting-vit")  # skips
    for name in names:
        path = PRETRAINED / name
        before = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
        bb = load_checkpoint(path)
        assert bb.config["format_version"] == 1 and len(bb.classes) == bb.num_classes
        assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == before
