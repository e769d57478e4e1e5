"""Named pretrained models shipped inside the package: ``vitlens.load_model("vitlens:fashion-vit-pm")``.

The small models vitlens trains itself live here as ordinary vitlens checkpoint directories
(``config.json``, ``model.safetensors``, ``metrics.jsonl``), a few MB each, so that the embedded
default works offline and from an installed wheel, the way scikit-learn and scikit-image ship their
sample data. Their training commands and figures are recorded in each ``config.json``; ``vitlens
models`` lists them. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import VitlensError

ROOT = Path(__file__).resolve().parent
SCHEME = "vitlens"

#: One line per shipped model: what it is for.
DESCRIPTIONS: dict[str, str] = {
    "counting-vit": "ViT that counts the red cells of a 3×3 grid (a task whose evidence is known exactly)",
    "counting-vit-diffmask": "Vision DiffMask gates trained on the frozen counting-vit",
    "fashion-vit": "conv-stem ViT (1.1 M parameters, 8×8 tokens) for Fashion-MNIST objects on 64×64 canvases",
    "fashion-vit-pm": "fashion-vit fine-tuned for PM (patch-level mask prediction) with 1% of the masks",
    "fashion-vit-diffmask": "Vision DiffMask gates trained on the frozen fashion-vit",
    "fashion-bcos-vit": "B-cos ViT (0.64 M parameters) for fashion-canvas: explanations from its own weights",
}


def names() -> list[str]:
    """The names of the shipped models (those whose directory holds a ``config.json``), sorted."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())


def path(name: str) -> Path:
    """The checkpoint directory of the shipped model ``name``.

    Args:
        name: a name such as ``"fashion-vit-pm"``; a leading ``"vitlens:"`` is accepted.

    Returns:
        The directory, loadable with :func:`vitlens.load_model`.

    Raises:
        VitlensError: ``name`` is not a shipped model (the message lists the known names).
    """
    bare = name.removeprefix(f"{SCHEME}:")
    known = names()
    if bare not in known:
        raise VitlensError(f"unknown vitlens model {bare!r} (known: {', '.join(known) or 'none installed'})")
    return ROOT / bare


def _base(record: str | None) -> str:
    """A recorded base model (``checkpoints/fashion-vit`` when it was trained) under its shipped name."""
    if not record:
        return "—"
    tail = Path(record).name
    return f"{SCHEME}:{tail}" if tail in DESCRIPTIONS else record


def describe(name: str) -> dict:
    """One shipped model's figures, read from its ``config.json`` (no weights are loaded).

    Returns:
        A dict with ``name`` (``vitlens:NAME``), ``kind``, ``base`` (the model it was trained from),
        ``classes`` (their number), ``input_size``, ``figure`` (held-out accuracy, or the held-out KL of
        DiffMask gates), ``size_mb`` (of the weights) and ``description``.
    """
    folder = path(name)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    training = config.get("training") or {}
    if isinstance(training.get("test_accuracy"), int | float):
        n = training.get("test_n")
        figure = f"{100 * training['test_accuracy']:.2f}% test accuracy" + (f" ({n:,} images)" if n else "")
    elif isinstance(training.get("held_out_kl"), int | float):
        figure = f"held-out KL {training['held_out_kl']:.3f}"
    else:
        figure = "—"
    return {
        "name": f"{SCHEME}:{folder.name}",
        "kind": config["kind"],
        "base": _base(training.get("base_model")),
        "classes": len(config["classes"]),
        "input_size": config["preprocessing"]["input_size"],
        "figure": figure,
        "size_mb": round((folder / "model.safetensors").stat().st_size / 1e6, 1),
        "description": DESCRIPTIONS.get(folder.name, ""),
    }
