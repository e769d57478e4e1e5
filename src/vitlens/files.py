"""Explaining image files: the pipeline behind ``vitlens explain`` (streams in batches, skips bad files)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch

from .backbones import Backbone, load_model
from .data import load_image
from .data.images import IMAGE_SUFFIXES, is_image_file
from .errors import VitlensError
from .explainers import check_target, get_explainer, resolve_target
from .io import atomic_save_npy, check_output_dir
from .viz import overlay, save_png


def image_paths(paths: Iterable[str | os.PathLike], skip: str | os.PathLike | None = None) -> Iterator[str]:
    """The files as given, in order; a folder stands for the image files under it (recursive, sorted).

    ``skip`` (the output folder) is never descended into. A folder with no image file is an error.
    """
    skip_real = os.path.realpath(skip) if skip is not None else None
    for p in paths:
        p = os.fspath(p)
        if not os.path.isdir(p):
            yield p
            continue
        found = 0
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip_real)
            for f in sorted(files):
                if is_image_file(f):
                    found += 1
                    yield os.path.join(root, f)
        if not found:
            raise VitlensError(f"{p}: no image files in this folder (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")


def _batches(paths: Iterable[str], size: tuple[int, int], batch_size: int) -> Iterator[tuple[list, list]]:
    """Yield (good [(path, image)], bad [(path, error)]) per batch of ``batch_size`` files, reading lazily."""
    it = iter(paths)
    while chunk := list(islice(it, batch_size)):
        good, bad = [], []
        for p in chunk:
            try:
                good.append((p, load_image(p, size)))
            except VitlensError as e:
                bad.append((p, str(e)))
        yield good, bad


def _unique_stem(path: str, taken: set[str]) -> str:
    stem, k = Path(path).stem, 1
    name = stem
    while name in taken:
        k += 1
        name = f"{stem}-{k}"
    taken.add(name)
    return name


def explain_files(
    paths: Iterable[str | os.PathLike],
    model: str | Backbone,
    method: str = "rollout",
    *,
    target: int | None = None,
    out: str | os.PathLike = "vitlens-out",
    batch_size: int = 16,
    options: dict | None = None,
) -> Iterator[dict]:
    """Explain image files batch by batch; yields one record per input, in order of completion.

    ``paths`` are image files or folders of them (see :func:`image_paths`), read lazily batch by batch,
    so memory stays flat however many there are; a file that cannot be read gives an error record and
    the run goes on.

    A good image gives ``{"image", "predicted", "target", "map", "overlay"}`` (paths of the written
    ``.npy`` patch-grid map and ``.png`` overlay, plus one path per picture of the method's own, e.g.
    ``"bcos-colour"``); a bad one ``{"image", "error"}``.
    """
    if batch_size < 1:
        raise VitlensError(f"batch size must be at least 1, got {batch_size}")
    backbone = load_model(model)
    explainer = get_explainer(method, backbone, **(options or {}))
    if target is not None:
        check_target(target, backbone.num_classes)
    out = check_output_dir(out)
    paths = image_paths([paths] if isinstance(paths, str | os.PathLike) else paths, skip=out)
    taken: set[str] = set()
    device = backbone.mean.device
    for good, bad in _batches(paths, backbone.preprocessing.input_size, batch_size):
        for p, err in bad:
            yield {"image": p, "error": err}
        if not good:
            continue
        images = torch.stack([img for _, img in good]).to(device)
        with_pictures = getattr(explainer, "explain_with_pictures", None)  # methods with pictures of their own
        if with_pictures is not None:  # B-cos: the colour explanation beside the overlay
            maps, logits, pictures = with_pictures(images, target)
        else:
            (maps, logits), pictures = explainer.explain_and_predict(images, target), {}
        probs = logits.softmax(1).cpu()
        targets = resolve_target(target, probs)
        for i, ((p, img), m, prob, t) in enumerate(zip(good, maps.cpu(), probs, targets, strict=True)):
            stem = _unique_stem(p, taken)
            extra = {suffix: str(out / f"{stem}.{suffix}.png") for suffix in pictures}
            for suffix, path in extra.items():
                save_png(pictures[suffix][i], path)
            map_path, png_path = out / f"{stem}.{method}.npy", out / f"{stem}.{method}.png"
            atomic_save_npy(map_path, m.numpy())
            pred = int(prob.argmax())
            title = f"{method} · {backbone.classes[int(t)]}"
            title += f" · pred {backbone.classes[pred]} {prob[pred]:.2f}"
            save_png(overlay(img, m, title=title), png_path)
            yield {
                "image": p,
                "predicted": pred,
                "predicted_class": backbone.classes[pred],
                "probability": round(float(prob[pred]), 4),
                "target": int(t),
                "map": str(map_path),
                "overlay": str(png_path),
                **extra,
            }
