"""The procedural ``shapes`` data set and the export of any data set to the folder layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitlens.data import open_dataset, parse_data_spec
from vitlens.data.export import class_folders, export_folder
from vitlens.data.fashion import CLASSES as FASHION
from vitlens.data.shapes import CLASSES, shape_mask
from vitlens.errors import VitlensError
from vitlens.training.pm import labelled_indices


def test_shapes_are_deterministic_and_order_independent():
    a, b = open_dataset("shapes:train:n=50"), open_dataset("shapes:train:n=50")
    late = b[37]  # drawn first here, last there
    first = [a[i] for i in range(50)]
    assert torch.equal(first[37]["image"], late["image"]) and torch.equal(first[37]["mask"], late["mask"])
    other = open_dataset("shapes:train:n=50,seed=1")[37]
    assert not torch.equal(other["image"], late["image"])
    test = open_dataset("shapes:test:n=50")[37]
    assert not torch.equal(test["image"], late["image"])  # splits are different streams
    assert {s["label"] for s in first} <= set(range(len(CLASSES))) and len({s["label"] for s in first}) >= 6


def test_masks_lie_in_their_boxes_and_every_box_is_tight():
    data = open_dataset("shapes:train:n=120,objects=4")
    counts = set()
    for i in range(len(data)):
        s = data[i]
        mask, boxes = s["mask"].numpy(), s["boxes"].numpy().astype(int)
        assert s["image"].shape == (3, 64, 64) and mask.any() and 1 <= len(boxes) <= 4
        counts.add(len(boxes))
        inside = np.zeros_like(mask)
        for x0, y0, x1, y1 in boxes:
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            part = mask[y0 : y1 + 1, x0 : x1 + 1]  # tight: the shape touches all four sides of its box
            assert part[0].any() and part[-1].any() and part[:, 0].any() and part[:, -1].any()
        assert not (mask & ~inside).any()  # no mask pixel outside every box
        for j, a in enumerate(boxes):  # shapes are kept apart: boxes do not overlap much
            for b in boxes[j + 1 :]:
                w = min(a[2], b[2]) - max(a[0], b[0]) + 1
                h = min(a[3], b[3]) - max(a[1], b[1]) + 1
                assert max(0, w) * max(0, h) < 0.25 * min(
                    (a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
                )
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize(
    "kind, area",
    [("circle", math.pi), ("ring", math.pi * (1 - 0.55**2)), ("square", 1.6**2), ("diamond", 2.0),
     ("hexagon", 2 * math.sqrt(3) * 0.87**2)],
)  # fmt: skip
def test_shape_areas_match_geometry(kind, area):
    r = 200.0
    yy, xx = np.mgrid[-256:256, -256:256].astype(np.float64)
    assert shape_mask(kind, xx, yy, r).sum() / r**2 == pytest.approx(area, rel=0.01)


def test_shape_kinds_differ():
    yy, xx = np.mgrid[-40:40, -40:40].astype(np.float64)
    masks = {k: shape_mask(k, xx, yy, 30.0) for k in CLASSES}
    for i, a in enumerate(CLASSES):
        for b in CLASSES[i + 1 :]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.9, (a, b)


def test_shapes_options_are_bounded():
    with pytest.raises(VitlensError, match="objects=7 out of range"):
        parse_data_spec("shapes:train:objects=7")
    assert len(open_dataset("shapes:test:n=3,size=96")[0]["image"][0]) == 96


def test_export_round_trips_through_folder(tmp_path):
    out = export_folder("shapes:test:n=30", tmp_path / "shapes", labelled=0.5, seed=3)
    assert out == tmp_path / "shapes" / "test"
    source = open_dataset("shapes:test:n=30")
    folder = open_dataset(f"folder:{tmp_path / 'shapes'}:test")
    assert folder.classes == CLASSES  # same names, same order: same labels
    assert len(folder) == 30
    labelled = labelled_indices(folder)
    assert len(labelled) == 15
    for j in range(len(folder)):
        f = folder[j]
        i = int(folder.files[j][0].split("/")[1][:-4])  # <class>/<index>.png
        s = source[i]
        assert f["label"] == s["label"] and torch.equal(f["image"], s["image"])  # 8-bit images: exact
        if j in labelled:
            assert torch.equal(f["boxes"], s["boxes"]) and torch.equal(f["mask"], s["mask"])
        else:
            assert "boxes" not in f and "mask" not in f
    with pytest.raises(VitlensError, match="already exists"):
        export_folder("shapes:test:n=30", tmp_path / "shapes")


def test_export_keeps_label_order_for_any_class_names(tmp_path):
    names = class_folders(list(FASHION))
    assert names == sorted(names) and len(set(names)) == 10 and all("/" not in n for n in names)
    assert class_folders(list(CLASSES)) == list(CLASSES)  # already safe and sorted: unchanged
    export_folder("counting:train:n=12,grid=2", tmp_path / "c", masks=False)
    folder = open_dataset(f"folder:{tmp_path / 'c'}:train")
    source = open_dataset("counting:train:n=12,grid=2")
    by_index = {int(rel.split("/")[1][:-4]): lab for rel, lab in folder.files}
    assert all(by_index[i] == source[i]["label"] for i in range(12))
    assert not (tmp_path / "c" / "train" / "masks").exists()


def test_export_command_line(tmp_path, capsys):
    from vitlens.data.export import main

    assert main(["shapes:train:n=4", str(tmp_path / "s"), "--labelled", "0.5"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "s" / "train")
    assert len(labelled_indices(open_dataset(f"folder:{tmp_path / 's'}:train"))) == 2
    assert main([f"folder:{tmp_path / 's'}:train", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip().endswith("export_folder: the data set is already in the folder layout")
