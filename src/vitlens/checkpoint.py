"""vitlens checkpoints: a directory with ``model.safetensors`` and ``config.json`` (SPEC §2).

A checkpoint is written whole into a temporary directory and swapped in place, so an interrupted
write leaves the previous complete checkpoint (recovered on load if the swap itself was cut short).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .backbones import Backbone, Preprocessing, adapt, build_module
from .errors import VitlensError
from .io import atomic_replace_dir

FORMAT = "vitlens-checkpoint"
FORMAT_VERSION = 1
KINDS = ("classifier", "pm", "diffmask", "bcos")
WEIGHTS, CONFIG, STATE = "model.safetensors", "config.json", "training_state.pt"
REQUIRED = {"format": str, "format_version": int, "kind": str, "model": dict, "classes": list, "preprocessing": dict}


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _recover(path: Path) -> None:
    """Finish a swap that was interrupted between its two renames."""
    old = _old(path)
    if not (path / CONFIG).exists() and (old / CONFIG).exists():
        if path.exists():
            shutil.rmtree(path)
        os.replace(old, path)


def save_checkpoint(
    path: str | os.PathLike,
    backbone: Backbone,
    *,
    kind: str = "classifier",
    training: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_config: dict | None = None,
    state: dict | None = None,
) -> Path:
    """Write ``backbone`` (plus a method's extra tensors and config) as a checkpoint directory.

    ``state`` (optimizer, schedule, step, RNG) goes to ``training_state.pt`` for ``--resume``. Other
    files already in the directory (``metrics.jsonl``, …) are carried over.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if backbone.spec is None:
        raise VitlensError("this model has no architecture spec; load it with vitlens.load_model(URI) to save it")
    path = Path(path)
    _recover(path)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in backbone.model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vitlens_version": __version__,
        "kind": kind,
        "model": backbone.spec,
        "classes": list(backbone.classes),
        "preprocessing": backbone.preprocessing.to_dict(),
        "training": training or {},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra_config or {}),
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if state is not None:
            torch.save(state, tmp / STATE)
        if path.is_dir():
            for f in path.iterdir():
                if f.name not in (WEIGHTS, CONFIG, STATE) and not (tmp / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)

    return atomic_replace_dir(path, fill)


def read_config(path: str | os.PathLike) -> dict:
    """Read and validate ``config.json`` of a checkpoint directory."""
    path = Path(path)
    _recover(path)
    file = path / CONFIG
    if not path.is_dir():
        raise VitlensError(f"{path}: no such checkpoint directory")
    if not file.is_file():
        raise VitlensError(f"{path} is not a vitlens checkpoint (no {CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitlensError(f"{file}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from e
    for key, typ in REQUIRED.items():
        if not isinstance(config.get(key), typ):
            raise VitlensError(f"{file}: missing or invalid {key!r}")
    if config["format"] != FORMAT:
        raise VitlensError(f"{file}: not a vitlens checkpoint (format {config['format']!r})")
    if config["format_version"] > FORMAT_VERSION:
        raise VitlensError(
            f"{file}: checkpoint format {config['format_version']} is newer than this vitlens "
            f"({FORMAT_VERSION}); upgrade vitlens"
        )
    if config["kind"] not in KINDS:
        raise VitlensError(f"{file}: unknown kind {config['kind']!r} (known: {', '.join(KINDS)})")
    return config


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise VitlensError(f"{path}: missing {WEIGHTS}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise VitlensError(f"{file} is truncated or corrupted ({e})") from e


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> Backbone:
    """Load a checkpoint directory as a :class:`Backbone` (eval mode) with ``.config`` attached.

    Methods that store extra tensors (DiffMask probes, …) find them in ``backbone.extra_tensors``.
    """
    config = read_config(path)
    if kind is not None and config["kind"] != kind:
        raise VitlensError(f"{path} is a {config['kind']} checkpoint, but a {kind} checkpoint is needed")
    tensors = load_tensors(path)
    module, _ = build_module(config["model"])
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise VitlensError(f"{path}: weights do not match the architecture ({' '.join(lines[1:3])[:300]})") from e
    backbone = adapt(module, Preprocessing.from_dict(config["preprocessing"]), config["classes"])
    backbone.spec = config["model"]
    backbone.config = config
    backbone.extra_tensors = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    backbone.checkpoint_path = str(path)
    return backbone.eval()
