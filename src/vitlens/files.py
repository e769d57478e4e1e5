"""Explaining image files: the pipeline behind ``vitlens explain`` (streams in batches, skips bad files).

Outputs mirror the inputs' folder tree under ``out``: ``photos/bag/000.jpg`` explained with ``gae`` gives
``OUT/bag/000.gae.npy`` (the patch-grid map) and ``OUT/bag/000.gae.png`` (the overlay at the photo's own
resolution, aspect kept), whatever the order of the inputs, so two inputs never share an output name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch

from .backbones import Backbone
from .data.images import IMAGE_SUFFIXES, is_image_file, read_image, resize
from .errors import VitlensError
from .explainers import TopK, get_explainer, parse_target
from .explainers.bcos import colour_picture
from .explainers.prompts import bind_target
from .io import atomic_save_npy, atomic_write_text, check_output_dir
from .models import load_model
from .viz import save_png
from .viz.overlay import overlay

#: Overlays are drawn at the image's own resolution, its longer side capped at this many pixels.
MAX_OVERLAY_SIDE = 2048


def image_paths(paths: Iterable[str | os.PathLike], skip: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """``(path, output name)`` for every input, in order; a folder stands for the image files under it
    (recursive, sorted).

    The output name is the file's path relative to the folder it was found in (``bag/000.jpg``) or, for a
    file given by itself, relative to the common folder of all file arguments, so that outputs mirror the
    input tree and never collide. ``skip`` (the output folder) is never descended into. A folder with no
    image file is an error.
    """
    paths = [os.fspath(p) for p in paths]
    files = [os.path.abspath(p) for p in paths if not os.path.isdir(p)]
    root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    skip_real = os.path.realpath(skip) if skip is not None else None
    for p in paths:
        if not os.path.isdir(p):
            yield p, os.path.relpath(os.path.abspath(p), root)
            continue
        found = 0
        for folder, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) != skip_real)
            for f in sorted(names):
                if is_image_file(f):
                    found += 1
                    full = os.path.join(folder, f)
                    yield full, os.path.relpath(full, p)
        if not found:
            raise VitlensError(f"{p}: no image files in this folder (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")


def display_size(original: tuple[int, int], limit: int = MAX_OVERLAY_SIDE) -> tuple[int, int]:
    """The image's own size ``(H, W)``, scaled down so its longer side is at most ``limit``."""
    h, w = original
    factor = min(1.0, limit / max(h, w))
    return max(1, round(h * factor)), max(1, round(w * factor))


def _batches(paths: Iterable[tuple[str, str]], batch_size: int) -> Iterator[tuple[list, list]]:
    """Yield (good [(path, name, picture, original size)], bad [(path, error)]) per batch, reading lazily.

    ``picture`` is the image at its own resolution (capped at :data:`MAX_OVERLAY_SIDE`): overlays are drawn
    on it, and the model's input is resized from it.
    """
    it = iter(paths)
    while chunk := list(islice(it, batch_size)):
        good, bad = [], []
        for p, name in chunk:
            try:
                picture, original = read_image(p, None)
                if max(original) > MAX_OVERLAY_SIDE:
                    picture = read_image(p, display_size(original))[0]
                good.append((p, name, picture, original))
            except VitlensError as e:
                bad.append((p, str(e)))
        yield good, bad


def explain_files(
    paths: Iterable[str | os.PathLike],
    model: str | Backbone,
    method: str = "rollout",
    *,
    target: object = None,
    top_k: int | None = None,
    out: str | os.PathLike = "vitlens-out",
    batch_size: int = 16,
    options: dict | None = None,
    device: str | None = None,
    boxes: float | None = None,
) -> Iterator[dict]:
    """Explain image files batch by batch; yields one record per input, in order of completion.

    Args:
        paths: image files or folders of them (see :func:`image_paths`), read lazily batch by batch, so
            memory stays flat however many there are; a file that cannot be read gives an error record
            and the run goes on.
        model: a model URI, a checkpoint directory or a :class:`Backbone`.
        method: the method (``vitlens methods``).
        target: a class index or name for every image (``None``: the predicted class); for an image–text
            model without classes, a text prompt.
        top_k: explain each image's ``top_k`` highest-scoring classes instead (one overlay per class).
        out: the output folder; outputs mirror the inputs' tree in it.
        batch_size: images per batch.
        options: the method's options.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, … (default: where the model is).
        boxes: also localise (weakly supervised object localisation, as the WSOL protocol draws boxes):
            each map, upsampled to the image and min-max normalised, keeps the pixels above
            ``boxes`` × its maximum, and the box around the largest connected component goes into the
            record (``"box"``, pixels of the original image) and into ``OUT/localization.txt``
            (``relative/path.png,x0,y0,x1,y1``, the format folder data sets read).

    Returns:
        An iterator of records: a good image gives ``{"image", "predicted", "predicted_class",
        "probability", "target", "target_class", "constant", "map", "overlay"}`` (with ``--top-k``: lists
        ``"targets"``, ``"target_classes"``, ``"constant"``, ``"overlays"``, and the ``.npy`` holds
        ``[K, gh, gw]``) plus one path per picture of the method's own (``"bcos-colour"``); a bad one
        ``{"image", "error"}``.
    """
    if batch_size < 1:
        raise VitlensError(f"batch size must be at least 1, got {batch_size}")
    backbone = load_model(model, device=device)
    if backbone.headless:
        raise VitlensError(
            "this model has no classifier head: files are explained for classes; from Python, explain its "
            "embedding with target=EmbeddingSimilarity(...)"
        )
    explainer = get_explainer(method, backbone, **(options or {}))
    if top_k is not None:
        if target is not None:
            raise VitlensError("give either a target or top_k, not both")
        target = TopK(top_k)
    target = bind_target(target, backbone)  # a text prompt of an image–text model: embedded once
    classified = getattr(backbone, "has_classes", True)  # an image–text model without classes has no prediction
    parse_target(target, 1, backbone.classes)  # refuse a bad target before reading any image
    out = check_output_dir(out)
    paths = image_paths([paths] if isinstance(paths, str | os.PathLike) else paths, skip=out)
    if boxes is not None and not 0 <= boxes < 1:
        raise VitlensError(f"boxes: the threshold must be in [0, 1), got {boxes}")
    size, device = backbone.preprocessing.input_size, backbone.mean.device
    written: dict[str, str] = {}
    localisation: list[str] = []
    for good, bad in _batches(paths, batch_size):
        for p, err in bad:
            yield {"image": p, "error": err}
        if not good:
            continue
        images = torch.stack([resize(pic[None], size)[0] for _, _, pic, _ in good]).to(device)
        e = explainer(images, target)
        probs = e.probabilities.cpu() if classified else None
        for i, (p, name, picture, original) in enumerate(good):
            stem = Path(name).with_suffix("")
            if written.setdefault(str(stem), p) != p:
                raise VitlensError(f"{p} and {written[str(stem)]} would both be written as {out / stem}.*")
            if not torch.isfinite(e.maps[i]).all() or (probs is not None and not torch.isfinite(probs[i]).all()):
                yield {"image": p, "error": f"{p}: the model's output or the map is not finite (NaN or Inf)"}
                continue
            record = _write(e[i], picture, out / stem, p, None if probs is None else probs[i])
            if boxes is not None:
                from .metrics.localisation import map_box

                record["box"] = map_box(e.maps[i].reshape(-1, *e.grid)[0].cpu(), original, boxes)
                localisation.append(",".join([Path(name).as_posix(), *map(str, record["box"])]))
            yield record
    if boxes is not None:
        atomic_write_text(out / "localization.txt", "".join(f"{line}\n" for line in localisation))


def _write(e, picture: torch.Tensor, stem: Path, path: str, prob: torch.Tensor | None) -> dict:
    """Write one image's map, overlays and own pictures; return its record (``prob`` ``None``: the model
    predicts no class, e.g. an image–text model explained for a prompt)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    method = e.method
    maps = e.maps[0].cpu()
    names = e.class_names[0] if e.multi_target else [e.class_names[0]]
    constant = e.degenerate[0].reshape(-1).tolist()
    record = {"image": path}
    caption = ""
    if prob is not None:
        pred = int(prob.argmax())
        pred_name = e.classes[pred]
        caption = f" · pred {pred_name} {prob[pred]:.2f}"
        record.update(predicted=pred, predicted_class=pred_name, probability=round(float(prob[pred]), 4))
    map_path = Path(f"{stem}.{method}.npy")
    atomic_save_npy(map_path, maps.numpy())
    overlays = []
    for k, (m, name) in enumerate(zip(maps if e.multi_target else maps[None], names, strict=True)):
        suffix = f".top{k + 1}" if e.multi_target else ""
        png = Path(f"{stem}.{method}{suffix}.png")
        save_png(overlay(picture, m, title=f"{method} · {name}{caption}", scale=e.scale), png)
        overlays.append(str(png))
    record["map"] = str(map_path)
    targets = e.targets[0].reshape(-1).tolist() if e.targets is not None else [None] * len(names)
    if e.multi_target:
        record.update(targets=targets, target_classes=names, constant=constant, overlays=overlays)
    else:
        record.update(target=targets[0], target_class=names[0], constant=constant[0], overlay=overlays[0])
    if "colour" in e.extras:  # B-cos: the colour explanation beside the overlay
        colour = e.extras["colour"][0]
        colours = colour if e.multi_target else colour[None]
        h, w = picture.shape[-2:]
        for k, c in enumerate(colours):
            suffix = f".top{k + 1}" if e.multi_target else ""
            png = Path(f"{stem}.bcos-colour{suffix}.png")
            save_png(colour_picture(c, size=min(max(h, w, 256), MAX_OVERLAY_SIDE)), png)
            record.setdefault("bcos-colour", str(png))
    return record
