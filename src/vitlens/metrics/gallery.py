"""The gallery of an ``evaluate --out`` file: a few images with every method's map, for the report.

``vitlens report`` builds its page from a results file alone, so the file carries a small sample of the
evaluated images: each image (PNG, base64), its ground truth, the model's prediction, every method's map
on the patch grid for the class the evaluation explained, and the pictures a method draws itself (the
B-cos colour explanation).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from ..explainers.bcos import colour_picture


def pick_indices(dataset, k: int, n: int) -> list[int]:
    """Up to ``k`` indices among the first ``n`` samples: the first sample of every class in turn, then the
    next ones, so that the gallery shows as many classes as it can (at most ``20 k`` samples are read)."""
    scan = min(n, 20 * k)
    labels = {}
    for i in range(scan):
        s = dataset[i]
        if "error" not in s:
            labels[i] = int(s["label"])
    firsts: dict[int, int] = {}
    for i, label in labels.items():
        firsts.setdefault(label, i)
    picked = sorted(firsts.values())[:k]
    rest = [i for i in labels if i not in picked]
    return sorted(picked + rest[: k - len(picked)])


def png_base64(picture: Image.Image | np.ndarray) -> str:
    """A picture (PIL, or uint8 ``[H, W, C]``) as base64-encoded PNG."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gallery_payload(backbone, explainers: dict, batch: dict, target: str) -> dict:
    """Images, ground truth, predictions and every method's maps for one batch already fitted to the model.

    ``target`` is ``"label"`` or ``"predicted"``, as in the evaluation, so the maps shown are the ones
    that were scored.
    """
    device = backbone.mean.device
    images = batch["image"].to(device)
    with torch.no_grad():
        probs = backbone(images).float().softmax(1).cpu()
    labels = batch["label"]
    targets = labels if target == "label" else probs.argmax(1)
    maps, pictures = {}, {}
    for name, explainer in explainers.items():
        explanation = explainer(images, targets.to(device))
        if "colour" in explanation.extras:  # B-cos: the colour explanation
            colour = [png_base64(colour_picture(c)) for c in explanation.extras["colour"]]
            pictures[name] = {"bcos-colour": colour}
        maps[name] = explanation.maps.cpu().tolist()
    pixels = (batch["image"].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return {
        "index": batch["index"].tolist(),
        "image": [png_base64(p) for p in pixels],
        "label": labels.tolist(),
        "boxes": [b.tolist() for b in batch["boxes"]],
        "target": targets.tolist(),
        "predicted": probs.argmax(1).tolist(),
        "probability": probs.max(1).values.tolist(),
        "maps": maps,
        "pictures": pictures,
    }
