"""Data sets: ground truth agrees with the pixels, determinism, spec parsing, folder layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vitlens import VitlensError
from vitlens.data import collate, load_image, open_dataset, parse_data_spec
from vitlens.data.counting import COLOURS


def _box_of(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()]


def test_fashion_canvas_ground_truth_matches_pixels():
    ds = open_dataset("fashion-canvas:test:n=20")
    fractions = []
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 64, 64) and s["image"].min() >= 0 and s["image"].max() <= 1
        assert s["label"] == int(ds.item_labels[i])
        assert s["boxes"].tolist() == [_box_of(s["mask"])]  # tight box of the mask
        inside, outside = s["image"][:, s["mask"]], s["image"][:, ~s["mask"]]
        # the tinted item stands out from the dark background it was pasted on
        assert inside.max(0).values.mean() > outside.max(0).values.mean() + 0.1
        fractions.append(s["mask"].float().mean().item())
    assert 0.03 < np.mean(fractions) < 0.2  # the object covers a minority of the canvas


def test_fashion_canvas_is_deterministic_and_order_independent():
    a = open_dataset("fashion-canvas:train:n=50")
    b = open_dataset("fashion-canvas:train:n=50")
    for i in (49, 3, 17):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    c = open_dataset("fashion-canvas:train:n=50,seed=1")
    assert not torch.equal(a[3]["image"], c[3]["image"])
    assert not torch.equal(a[3]["image"], open_dataset("fashion-canvas:test:n=50")[3]["image"])


def test_fashion_grid_cells():
    ds = open_dataset("fashion-grid:test:n=5")
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 64, 64)
        assert len(set(s["labels"].tolist())) == 4 and s["label"] == s["labels"][0]
        for box, cell in zip(s["boxes"], s["cells"], strict=True):
            assert cell[0] <= box[0] <= box[2] <= cell[2] and cell[1] <= box[1] <= box[3] <= cell[3]
            x0, y0, x1, y1 = (int(v) for v in cell)
            assert s["mask"][y0 : y1 + 1, x0 : x1 + 1].any()


@pytest.mark.parametrize("colour, grid", [("red", 3), ("blue", 4), ("green", 2)])
def test_counting_label_is_number_of_target_cells(colour, grid):
    ds = open_dataset(f"counting:test:colour={colour},grid={grid},n=40")
    assert ds.classes == tuple(str(k) for k in range(grid**2 + 1))
    target = torch.tensor(COLOURS[colour])
    labels = []
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 16 * grid, 16 * grid)
        cells = s["image"][:, 8::16, 8::16].permute(1, 2, 0).reshape(-1, 3)  # one pixel per cell centre
        close = ((cells - target).abs().max(1).values <= 0.1 + 1e-6).sum().item()
        assert close == s["label"] == len(s["boxes"])
        assert s["mask"].float().sum() == 256 * s["label"]
        labels.append(s["label"])
    assert len(set(labels)) > grid  # labels spread over the range


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fashion-canvas", ("fashion-canvas", "test", {}, None)),
        ("fashion-canvas:train", ("fashion-canvas", "train", {}, None)),
        ("counting:train:colour=blue,grid=4", ("counting", "train", {"colour": "blue", "grid": 4}, None)),
        ("fashion-canvas:test:n=500,seed=1", ("fashion-canvas", "test", {"n": 500, "seed": 1}, None)),
        ("folder:/data/birds:train", ("folder", "train", {}, "/data/birds")),
        ("counting:n=5", ("counting", "test", {"n": 5}, None)),
    ],
)
def test_parse_data_spec(spec, expected):
    s = parse_data_spec(spec)
    assert (s.name, s.split, s.options, s.root) == expected
    assert parse_data_spec(str(s)) == s


@pytest.mark.parametrize(
    "spec", ["", "nope", "fashion-canvas:dev", "counting:train:size=3", "counting:train:grid=x", "folder", "counting:n"]
)
def test_bad_data_specs(spec):
    with pytest.raises(VitlensError):
        parse_data_spec(spec)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_data_spec_parser_never_crashes(text):
    try:
        spec = parse_data_spec(text)
    except VitlensError:
        return
    assert spec.name in ("fashion-canvas", "fashion-grid", "counting", "folder")


@pytest.fixture
def folder_data(tmp_path):
    root = tmp_path / "birds"
    for cls, colour in (("crow", (0, 0, 0)), ("robin", (200, 40, 30))):
        d = root / "test" / cls
        d.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40, 20), colour).save(d / f"{k}.png")
    (root / "test" / "robin" / "bad.png").write_bytes(b"not an image")
    (root / "test" / "localization.txt").write_text("robin/0.png,4,2,19,9\nrobin/0.png,20,10,39,19\n")
    mask_dir = root / "test" / "masks" / "robin"
    mask_dir.mkdir(parents=True)
    m = np.zeros((20, 40), dtype=np.uint8)
    m[2:10, 4:20] = 255
    Image.fromarray(m).save(mask_dir / "0.png")
    return root


def test_folder_dataset(folder_data):
    ds = open_dataset(f"folder:{folder_data}:test", size=(10, 20))
    assert ds.classes == ("crow", "robin") and len(ds) == 5
    samples = [ds[i] for i in range(len(ds))]
    robin0 = next(s for s in samples if s.get("path", "").endswith("robin/0.png"))
    assert robin0["image"].shape == (3, 10, 20) and robin0["label"] == 1
    assert robin0["boxes"].tolist() == [[2, 1, 9, 4], [10, 5, 19, 9]]  # scaled by 1/2
    assert robin0["mask"].shape == (10, 20) and robin0["mask"][1:5, 2:10].all() and robin0["mask"].sum() == 32
    bad = [s for s in samples if "error" in s]
    assert len(bad) == 1 and "bad.png" in bad[0]["path"]
    batch = collate(samples)
    assert batch["image"].shape == (4, 3, 10, 20) and len(batch["errors"]) == 1
    assert batch["has_mask"].sum() == 1


def test_folder_bad_localization(folder_data):
    (folder_data / "test" / "localization.txt").write_text("robin/0.png,1,2\n")
    with pytest.raises(VitlensError, match="localization.txt:1"):
        open_dataset(f"folder:{folder_data}:test")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "LA", "CMYK"])
def test_load_image_modes(tmp_path, mode):
    arr = (np.arange(24 * 16).reshape(16, 24) % 256).astype(np.uint8)
    im = Image.fromarray(arr.astype(np.uint16) * 256) if mode == "I;16" else Image.fromarray(arr)
    if mode not in ("L", "I;16"):
        im = im.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    x = load_image(path)
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert load_image(path, size=(8, 12)).shape == (3, 8, 12)


def test_load_image_exif_orientation(tmp_path):
    im = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (3, 30, 10)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x89PNG\r\n\x1a\n" + b"\0" * 30])
def test_load_image_errors_are_user_errors(tmp_path, content):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(VitlensError, match="bad.png"):
        load_image(p)
    with pytest.raises(VitlensError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_folder_ignore_regions(folder_data):
    """``ignore/<relative path>`` marks pixels no pixel metric scores (OpenImages' ignore boxes); the folder
    is not a class."""
    ignore_dir = folder_data / "test" / "ignore" / "robin"
    ignore_dir.mkdir(parents=True)
    m = np.zeros((20, 40), dtype=np.uint8)
    m[10:20, 20:40] = 255
    Image.fromarray(m).save(ignore_dir / "0.png")
    ds = open_dataset(f"folder:{folder_data}:test", size=(10, 20))
    assert ds.classes == ("crow", "robin")
    samples = [ds[i] for i in range(len(ds))]
    robin0 = next(s for s in samples if s.get("path", "").endswith("robin/0.png"))
    assert robin0["ignore"].shape == (10, 20) and robin0["ignore"][5:, 10:].all() and robin0["ignore"].sum() == 50
    batch = collate(samples)
    assert batch["ignore"].shape == (4, 10, 20) and batch["ignore"].sum() == 50  # the others: nothing ignored
