"""Train PM on your own data: a few fine-tuning steps on a folder data set with a few masks, then explain.

PM (patch-level mask prediction) fine-tunes a classifier so that its own head, applied to each patch
token, predicts where the class is; a small share of the training images needs a mask. Masks go in
ROOT/SPLIT/masks/<relative path> (white = object); images without one can still carry boxes in
ROOT/SPLIT/localization.txt. To stay offline and fast this example builds a tiny folder data set from
fashion-canvas images and fine-tunes the named model vitlens:fashion-vit for 20 steps; a real run uses
thousands (see `vitlens train pm --help`), so the figure sets the maps after these steps beside those of
vitlens:fashion-vit-pm, the same model after a full PM run. Runs on the CPU in well under a minute;
writes train_pm.png into the current folder.

    python examples/train_pm.py
"""

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no window: the figure is saved to a file

import torch
import torchvision.utils

import vitlens
from vitlens.data import open_dataset
from vitlens.training import TrainConfig, train_pm

BASE = "vitlens:fashion-vit"  # a plain classifier, never PM fine-tuned


def export_split(root: Path, split: str, spec: str, per_class: int) -> None:
    """``per_class`` images of every class to ROOT/SPLIT/<index>-<class>/ with their masks."""
    classes = vitlens.load_model(BASE).classes
    data = open_dataset(spec)
    counts = [0] * len(classes)
    for i in range(len(data)):
        sample = data[i]
        label = sample["label"]
        if counts[label] == per_class:
            continue
        counts[label] += 1
        # Folder labels follow the sorted folder names: prefix the model's class index to keep its order.
        relative = f"{label}-{classes[label].replace('/', '-')}/{counts[label]:03d}.png"
        for folder, picture in ((root / split, sample["image"]), (root / split / "masks", sample["mask"].float())):
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            torchvision.utils.save_image(picture, folder / relative)
    assert min(counts) == per_class, "fewer images than expected for some class"


with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp) / "my-data"
    export_split(root, "train", "fashion-canvas:train:n=200", per_class=5)  # 50 training images
    export_split(root, "test", "fashion-canvas:test:n=100", per_class=2)  # 20 held-out images

    # The same run as `vitlens train pm --model vitlens:fashion-vit --data folder:ROOT:train --out OUT
    # --mask-fraction 0.2 --mask-batch 6 --max-steps 20 --batch-size 8 --lr 2e-3 --warmup-steps 2`:
    # PM supervises 10 of the 50 images with their masks, 6 of them in every batch of 8; the settings
    # left out (composites, lambda, pos-weight) come from vitlens' recipe, which it reports on stderr.
    out = Path(tmp) / "fashion-vit-pm-mine"
    cfg = TrainConfig(max_steps=20, batch_size=8, lr=2e-3, warmup_steps=2, log_every=10)
    summary = train_pm(BASE, f"folder:{root}:train", out, cfg, mask_fraction=0.2, mask_batch=6)
    print("held-out accuracy after fine-tuning:", summary["test_accuracy"])

    # The fine-tuned checkpoint is an ordinary vitlens model directory: explain it with pm.
    model = vitlens.load_model(out)
    test = open_dataset(f"folder:{root}:test", size=(64, 64))
    images = torch.stack([test[i]["image"] for i in range(0, len(test), 5)])  # 4 images of different classes
    mine = vitlens.explain(model, images, method="pm", target=vitlens.TopK(2))  # the two top classes
    print("pm maps:", tuple(mine.maps.shape), "classes:", mine.class_names)
    full = vitlens.explain("vitlens:fashion-vit-pm", images, method="pm", target=mine.targets)  # same classes

    fig, axes = vitlens.show(images, {"pm, 20 steps": mine, "pm, full run": full})
    fig.savefig("train_pm.png", dpi=80)
    print("wrote train_pm.png")
