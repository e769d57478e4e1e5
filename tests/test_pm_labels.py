"""PM supervises only labelled images; its defaults carry the best fashion-canvas recipe."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from vitlens import demo
from vitlens.cli import build_parser
from vitlens.data import open_dataset
from vitlens.errors import VitlensError
from vitlens.models import load_model
from vitlens.training.pm import PMTask, labelled_indices, pm_settings, select_mask_indices

CLASSES = list("abcde")  # the tiny checkpoint's classes


def make_folder(root, boxed: dict[str, list[int]] | None = None, masked: tuple[str, ...] = (), per_class: int = 4):
    """ROOT/{train,test}/<class>/<i>.png, 32 px: a bright square on noise; ``localization.txt`` with boxes
    only for the train images in ``boxed`` (relative path → box) and mask files for those in ``masked``."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = (rng.uniform(0, 80, (32, 32, 3))).astype(np.uint8)
                img[8:20, 10:22] = 230
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    if boxed:
        lines = [f"{rel},{','.join(map(str, box))}" for rel, box in boxed.items()]
        (root / "train" / "localization.txt").write_text("\n".join(lines) + "\n")
    for rel in masked:
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 10:22] = 255
        (root / "train" / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "train" / "masks" / rel)
    return root


BOXED = {"a/0.png": [10, 8, 21, 19], "b/1.png": [10, 8, 21, 19], "c/2.png": [10, 8, 21, 19],
         "d/3.png": [10, 8, 21, 19]}  # fmt: skip


def test_only_labelled_images_are_selected_and_no_target_is_empty(tmp_path, tiny_checkpoint):
    root = make_folder(tmp_path / "data", BOXED, masked=("e/0.png",))
    data = open_dataset(f"folder:{root}:train", size=(32, 32))
    rels = [rel for rel, _ in data.files]
    expected = sorted(rels.index(r) for r in [*BOXED, "e/0.png"])
    assert labelled_indices(data) == expected  # read from localization.txt and masks/, not guessed
    assert all(("mask" in data[i]) or len(data[i]["boxes"]) for i in expected)
    assert not any("mask" in data[i] or "boxes" in data[i] for i in set(range(len(data))) - set(expected))
    # a fraction larger than the labelled share still draws only labelled images
    for seed in range(5):
        assert set(select_mask_indices(expected, 0.5, seed, n=len(data))) == set(expected)
        assert set(select_mask_indices(expected, 0.1, seed, n=len(data))) <= set(expected)
    bb = load_model(tiny_checkpoint)
    task = PMTask(bb, data, mask_batch=6, composites=2)
    assert task.mask_indices == expected
    torch.manual_seed(0)
    for _ in range(20):  # every supervised image has object patches for its own class
        _, labels, targets = task._mask_batch("cpu")
        assert (targets[torch.arange(len(labels)), labels].flatten(1).amax(1) > 0).all()
        assert targets.sum() > 0
        _, tile_targets = task._composite_batch("cpu")
        assert (tile_targets.flatten(2).amax(2) > 0).sum(1).ge(1).all()


def test_old_bug_would_have_drawn_unlabelled_images(tmp_path):
    """The fraction is drawn among labelled images: with 1 labelled image of 20, it is the one used."""
    root = make_folder(tmp_path / "data", {"c/2.png": [10, 8, 21, 19]})
    data = open_dataset(f"folder:{root}:train", size=(32, 32))
    only = [r for r, _ in data.files].index("c/2.png")
    assert select_mask_indices(labelled_indices(data), 0.01, 0, n=len(data)) == [only]


def test_fully_labelled_selection_is_unchanged():
    """On fully labelled data (fashion-canvas) the seeded 1% is the same draw as before: run 9 re-runs."""
    expected = sorted(np.random.default_rng([0, 7]).choice(60000, size=600, replace=False).tolist())
    assert select_mask_indices(range(60000), 0.01, 0, n=60000) == expected == select_mask_indices(60000, 0.01, 0)


def test_train_pm_says_how_many_images_are_labelled_and_uses_only_them(tmp_path, tiny_checkpoint, capsys):
    root = make_folder(tmp_path / "data", BOXED)
    out = tmp_path / "pm"
    code, stdout, err = run_cli(["train", "pm", "--model", str(tiny_checkpoint), "--data", f"folder:{root}:train",
                                 "--out", str(out), "--max-steps", "2", "--pseudo-masks", "0"], capsys)  # fmt: skip
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("vitlens: pm:")]
    assert lines[0] == "vitlens: pm: 4 of 20 training images carry a mask or a box; PM uses all of them"
    assert len(lines) == 2 and "chosen" in lines[1] and "composites 0" in lines[1]  # 4 labelled: too few
    config = json.loads((out / "config.json").read_text())
    data = open_dataset(f"folder:{root}:train")
    assert [data.files[i][0] for i in config["pm"]["mask_indices"]] == sorted(BOXED)
    assert config["pm"]["labelled"] == 4 and config["pm"]["pos_weight"] == 10.0


def test_no_labelled_images_is_refused_in_one_line_unless_pseudo_masks(tmp_path, tiny_checkpoint, capsys):
    root = make_folder(tmp_path / "data")
    args = ["train", "pm", "--model", str(tiny_checkpoint), "--data", f"folder:{root}:train", "--max-steps", "2"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no training image carries a mask or a box" in err
    assert "--pseudo-masks" in err and "Traceback" not in err
    # asked for: the first pseudo-mask round runs before the first step (it may find nothing on a random
    # model: then one line says so, never an empty target)
    code, _, err = run_cli([*args, "--out", str(tmp_path / "b"), "--pseudo-masks", "1"], capsys)
    assert "0 of 20 training images carry a mask or a box; PM uses none (pseudo-masks only)" in err
    assert code == 0 or (code == 2 and "vitlens: error: PM: no labelled images and the pseudo-mask round" in err), err


def _recipe_for(command: str, n_images: int, n_used: int, n_classes: int) -> dict:
    argv = demo.split_launcher(command)[1]
    a = build_parser().parse_args(argv)
    given = {"batch_size": a.batch_size, "max_steps": a.max_steps, "epochs": a.epochs, "lr": a.lr,
             "warmup_steps": a.warmup_steps, "lam": a.lam, "pos_weight": a.pos_weight, "mask_batch": a.mask_batch,
             "composites": a.composites, "pseudo_rounds": a.pseudo_rounds, "negatives": a.negatives}  # fmt: skip
    return pm_settings(n_images, n_used, n_classes, given)[0]


RUN9 = {"batch_size": 88, "max_steps": 4500, "epochs": None, "lr": 2e-4, "warmup_steps": 100, "lam": 10.0,
        "pos_weight": 10.0, "mask_batch": 8, "composites": 24, "pseudo_rounds": 0, "negatives": False}  # fmt: skip


def test_recorded_demo_command_still_gives_run_9():
    command = demo.TRAINING["fashion-vit-pm"][0][0]
    assert _recipe_for(command, 60000, 600, 10) == RUN9
    assert "--mask-fraction 0.01" in command  # 600 masks, as recorded


def test_defaults_are_run_9_on_fashion_sized_data_and_scale_down():
    assert _recipe_for("vitlens train pm --model m --data d --out o", 60000, 60000, 10) == RUN9
    small = _recipe_for("vitlens train pm --model m --data d --out o", 1400, 28, 10)
    assert small["pseudo_rounds"] == 0 and small["composites"] == 24 and small["max_steps"] == 500
    assert small["warmup_steps"] == 50 and small["batch_size"] == 88
    mid = _recipe_for("vitlens train pm --model m --data d --out o", 10000, 10000, 10)
    assert mid["max_steps"] == round(4.8 * 10000 / 64) and mid["pseudo_rounds"] == 0
    given = _recipe_for("vitlens train pm --model m --data d --out o --batch-size 44 --pseudo-masks 0", 1400, 28, 10)
    assert given["composites"] == 12 and given["batch_size"] == 44 and given["pseudo_rounds"] == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split("train pm --model m --data d --out o --composites -1"))


def test_bad_fraction_is_one_line(tmp_path, tiny_checkpoint):
    from vitlens.training import TrainConfig, train_pm

    with pytest.raises(VitlensError, match="mask-fraction"):
        train_pm(tiny_checkpoint, "counting:train:n=8", tmp_path / "x", TrainConfig(max_steps=1), mask_fraction=2.0)


def test_pseudo_mask_rounds_never_add_an_empty_target(tmp_path, tiny_checkpoint):
    root = make_folder(tmp_path / "data", {"a/0.png": [10, 8, 21, 19]}, per_class=6)
    data = open_dataset(f"folder:{root}:train", size=(32, 32))
    bb = load_model(tiny_checkpoint)
    task = PMTask(bb, data, pseudo_confidence=0.0, pseudo_threshold=2.0)  # no map exceeds 2: every target empty
    task.pseudo_label_round()
    assert task.pseudo_indices == []
    task.pseudo_threshold = -1.0  # every patch above: full targets, for the correctly classified images only
    task.pseudo_label_round()
    predicted = bb(torch.stack([data[i]["image"] for i in range(len(data))])).argmax(1)
    correct = [i for i in range(len(data)) if predicted[i] == data[i]["label"] and i not in task.mask_indices]
    assert sorted(task.pseudo_indices) == correct
    labels = torch.tensor([data[i]["label"] for i in task.pseudo_indices])
    assert (task.pseudo_targets[torch.arange(len(labels)), labels].flatten(1).amin(1) == 1).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_pseudo_mask_confidence_is_a_share_of_what_label_smoothing_lets_a_classifier_reach(
    tmp_path, tiny_checkpoint, smoothing
):
    """A classifier trained with label smoothing ε never goes beyond 1 − ε + ε / C: the bar is a share of that."""
    root = make_folder(tmp_path / "data", {"a/0.png": [10, 8, 21, 19]}, per_class=6)
    data = open_dataset(f"folder:{root}:train", size=(32, 32))
    bb = load_model(tiny_checkpoint)
    lines = []
    task = PMTask(bb, data, pseudo_threshold=-1.0, label_smoothing=smoothing, log=lines.append)
    with torch.no_grad():
        probs = bb(torch.stack([data[i]["image"] for i in range(len(data))])).softmax(1)
    conf, predicted = probs.max(1)
    task.pseudo_confidence = float(conf.median()) / (1 - smoothing + smoothing / probs.shape[1])  # half pass
    task.pseudo_label_round()
    expected = [
        i
        for i in range(len(data))
        if predicted[i] == data[i]["label"] and conf[i] >= conf.median() - 1e-6 and i not in task.mask_indices
    ]
    assert sorted(task.pseudo_indices) == expected
    assert lines == [lines[0]] and f"{len(expected)} of {len(data) - len(task.mask_indices)} unlabelled" in lines[0]


@pytest.mark.parametrize("in_memory", [True, False])
def test_unreadable_labelled_images_leave_the_pool(tmp_path, tiny_checkpoint, monkeypatch, in_memory):
    from vitlens.training import pm as pm_module

    root = make_folder(tmp_path / "data", BOXED)
    (root / "train" / "b" / "1.png").write_bytes(b"not a png")  # labelled in localization.txt, unreadable
    if not in_memory:
        monkeypatch.setattr(pm_module, "POOL_BYTES", 0)  # read from the data set at every step
    data = open_dataset(f"folder:{root}:train", size=(32, 32))
    bad = [rel for rel, _ in data.files].index("b/1.png")
    task = PMTask(load_model(tiny_checkpoint), data, mask_batch=8, composites=2)
    assert (task.pool is not None) == in_memory
    assert (bad in task.mask_indices) != in_memory  # dropped at once in memory; when first drawn otherwise
    torch.manual_seed(0)
    for _ in range(10):
        images, labels, targets = task._mask_batch("cpu")
        assert len(images) == 8 and (targets[torch.arange(8), labels].flatten(1).amax(1) > 0).all()
        tiles, _ = task._composite_batch("cpu")
        assert len(tiles) == 2
    assert bad not in task.mask_indices and len(task.mask_indices) == 3


def test_pseudo_targets_keep_only_the_component_around_the_peak():
    from vitlens.training.pm import peak_component

    volume = torch.zeros(6, 6)
    volume[0:2, 0:2] = 0.7  # the object, with the peak
    volume[1, 1] = 0.9
    volume[2, 2] = 0.6  # touches it diagonally: the same 8-connected region
    volume[4:6, 4:6] = 0.8  # clutter elsewhere above the threshold
    hard = (volume > 0.5).float()
    kept = peak_component(hard, volume)
    expected = torch.zeros(6, 6)
    expected[0:2, 0:2] = 1
    expected[2, 2] = 1
    assert torch.equal(kept, expected)
    volume[5, 5] = 0.95  # the peak moves to the other region: that one is kept
    moved = peak_component(hard, volume)
    assert kept.sum() == 5 and moved[4:, 4:].sum() == 4 and moved.sum() == 4


def test_negative_loss_is_bce_towards_zero_on_every_other_class():
    from vitlens.training.pm import negative_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 2, 2, requires_grad=True)
    labels = torch.tensor([0, 2, 2])
    loss = negative_loss(logits, labels)
    other = torch.ones(3, 4, dtype=torch.bool)
    other[torch.arange(3), labels] = False
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[other], torch.zeros(9, 2, 2))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (logits.grad[torch.arange(3), labels] == 0).all() and (logits.grad[other] != 0).all()
