"""vitlens checkpoints: a directory with ``model.safetensors`` and ``config.json``.

A checkpoint is written whole into a temporary directory and swapped in place, so an interrupted
write (even ``kill -9``) leaves the previous complete checkpoint: readers fall back to it while a swap
is cut short between its two renames, and the next writer finishes the swap.

Loading trusts nothing: ``config.json`` is checked against :data:`SCHEMA` (with a ``format_version``;
files without one are version 1), ``model.safetensors`` against the SHA-256 that ``config.json``
records, and every tensor's name and shape against the architecture before any weight is assigned.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
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
SOURCES = ("preset", "timm", "torchvision", "bcos", "hf")
WEIGHTS, CONFIG, STATE = "model.safetensors", "config.json", "training_state.pt"


def _int(v: object, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(v: object) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_number(x) for x in v)


#: ``config.json``: dotted key → (required, check, what is expected). Parents come before children.
SCHEMA: dict[str, tuple[bool, Callable[[object], bool], str]] = {
    "format": (True, lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": (False, _int, "a positive integer"),
    "kind": (True, lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "model": (True, lambda v: isinstance(v, dict), "an object"),
    "model.source": (True, lambda v: v in SOURCES, f"one of {', '.join(SOURCES)}"),
    "model.name": (True, lambda v: isinstance(v, str) and v != "", "a model name"),
    "model.kwargs": (False, lambda v: isinstance(v, dict), "an object"),
    "model.config": (False, lambda v: isinstance(v, dict), "an object"),
    "classes": (True, lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v), "class names"),
    "preprocessing": (True, lambda v: isinstance(v, dict), "an object"),
    "preprocessing.input_size": (True, lambda v: isinstance(v, list) and len(v) == 2 and all(map(_int, v)), "[H, W]"),
    "preprocessing.mean": (True, _numbers, "a list of numbers"),
    "preprocessing.std": (True, lambda v: _numbers(v) and min(v) > 0, "a list of positive numbers"),
    "preprocessing.interpolation": (False, lambda v: isinstance(v, str), "a string"),
    "training": (False, lambda v: isinstance(v, dict), "an object"),
    "vitlens_version": (False, lambda v: isinstance(v, str), "a string"),
    "weights_sha256": (False, lambda v: isinstance(v, str) and len(v) == 64, "a SHA-256 hex digest"),
}
#: What each kind stores beyond the model (checked like :data:`SCHEMA`).
KIND_SCHEMA: dict[str, dict[str, tuple[bool, Callable[[object], bool], str]]] = {
    "diffmask": {
        "diffmask": (True, lambda v: isinstance(v, dict), "an object"),
        "diffmask.dim": (True, _int, "a positive integer"),
        "diffmask.num_states": (True, lambda v: _int(v, 2), "an integer >= 2"),
        "diffmask.scale": (True, _number, "a number"),
        "diffmask.offset": (True, _number, "a number"),
    },
}


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | os.PathLike) -> None:
    """Clean up after a writer killed mid-save (writers call it; readers need not).

    Removes half-written temporaries and finishes a swap interrupted between its two renames.
    """
    path = Path(path)
    prefix = f".{path.name}."
    if path.parent.is_dir():
        for tmp in path.parent.iterdir():  # atomic_replace_dir's ".NAME.<8 random characters>.tmp"
            middle = tmp.name[len(prefix) : -len(".tmp")]
            ours = tmp.name.startswith(prefix) and tmp.name.endswith(".tmp") and len(middle) == 8 and "." not in middle
            if ours and tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
    old = _old(path)
    if (path / CONFIG).exists() or not (old / CONFIG).exists():
        return
    try:
        if path.exists():  # a directory left without its config (e.g. only a metrics log)
            shutil.rmtree(path)
        os.replace(old, path)
    except FileNotFoundError:  # another process (a torchrun rank) finished it first
        pass


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory, or one whose swap was cut short (so it loads all the same)."""
    path = Path(path)
    return path.is_dir() or (_old(path) / CONFIG).is_file()


def _resolve(path: Path) -> Path:
    """The directory holding the last complete checkpoint at ``path`` (``.NAME.old`` mid-swap)."""
    old = _old(path)
    return old if not (path / CONFIG).exists() and (old / CONFIG).exists() else path


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    recover(path)
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
        (tmp / CONFIG).write_text(json.dumps({**config, "weights_sha256": _sha256(tmp / WEIGHTS)}, indent=2) + "\n")
        if state is not None:
            torch.save(state, tmp / STATE)
        if path.is_dir():
            for f in path.iterdir():
                if f.name not in (WEIGHTS, CONFIG, STATE) and not (tmp / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)

    return atomic_replace_dir(path, fill)


def _lookup(config: dict, key: str) -> tuple[bool, object]:
    value: object = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def validate_config(config: object, where: str = CONFIG) -> dict:
    """Check a parsed ``config.json`` against :data:`SCHEMA`; returns it with ``format_version`` filled in."""
    if not isinstance(config, dict):
        raise VitlensError(f"{where}: not a JSON object")
    if config.get("format") != FORMAT:
        raise VitlensError(f"{where}: not a vitlens checkpoint (format {config.get('format')!r}, expected {FORMAT!r})")
    version = config.get("format_version", 1)  # checkpoints written before the field existed are version 1
    if _int(version) and version > FORMAT_VERSION:
        raise VitlensError(
            f"{where}: checkpoint format {version} is newer than this vitlens ({FORMAT_VERSION}); upgrade vitlens"
        )
    rules = {**SCHEMA, **KIND_SCHEMA.get(config.get("kind"), {})}
    for key, (required, check, expected) in rules.items():
        present, value = _lookup(config, key)
        if not present and required:
            raise VitlensError(f"{where}: missing {key!r} (expected {expected})")
        if present and not check(value):
            raise VitlensError(f"{where}: invalid {key!r} = {json.dumps(value)[:60]} (expected {expected})")
    if config["model"]["source"] == "hf" and "config" not in config["model"]:
        raise VitlensError(f"{where}: missing 'model.config' (a Hugging Face model needs its config)")
    if len(config["preprocessing"]["mean"]) != len(config["preprocessing"]["std"]):
        raise VitlensError(f"{where}: 'preprocessing.mean' and 'preprocessing.std' differ in length")
    return {**config, "format_version": version}


def read_config(path: str | os.PathLike) -> dict:
    """Read and validate ``config.json`` of a checkpoint directory."""
    path = Path(path)
    if not is_checkpoint_dir(path):
        raise VitlensError(f"{path}: no such checkpoint directory")
    file = _resolve(path) / CONFIG
    if not file.is_file():
        raise VitlensError(f"{path} is not a vitlens checkpoint (no {CONFIG})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitlensError(f"{file}: not valid JSON ({getattr(e, 'msg', e)})") from e
    except OSError as e:
        raise VitlensError(f"{file}: cannot read ({e.strerror or e})") from e
    return validate_config(config, str(file))


def load_tensors(path: str | os.PathLike, config: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, refused whole if the file is truncated or corrupted."""
    file = _resolve(Path(path)) / WEIGHTS
    if not file.is_file():
        raise VitlensError(f"{path}: missing {WEIGHTS}")
    expected = (config or {}).get("weights_sha256")
    if expected is not None and _sha256(file) != expected:
        raise VitlensError(f"{file} is corrupted: its SHA-256 differs from the one recorded in {CONFIG}")
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VitlensError(f"{file} is truncated or corrupted ({first[:200]})") from e
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise VitlensError(f"{file}: tensor {name!r} contains NaN or Inf values")
    return tensors


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def check_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Names and shapes of ``got`` must be exactly those of ``expected`` (a state dict), or nothing loads."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [
        f"{k} {list(got[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in got and got[k].shape != expected[k].shape
    ]
    problems = [f"{label}: {_few(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape (checkpoint vs model)", wrong))
                if names]  # fmt: skip
    if problems:
        raise VitlensError(f"{where} do not match the architecture; {'; '.join(problems)}")


def _check_extras(config: dict, extra: dict[str, torch.Tensor], where: str, blocks: int) -> None:
    """The tensors a kind stores beyond the model (DiffMask's gates) must fit their config."""
    if config["kind"] != "diffmask":
        return
    from .explainers.diffmask import DiffMaskGates

    settings = config["diffmask"]
    if settings["num_states"] != blocks + 2:
        raise VitlensError(
            f"{where}: 'diffmask.num_states' is {settings['num_states']}, but the model has {blocks} blocks "
            f"({blocks + 2} hidden states)"
        )
    gates = DiffMaskGates(settings["dim"], settings["num_states"], settings["scale"], settings["offset"])
    got = {k[len("gates.") :]: v for k, v in extra.items() if k.startswith("gates.")}
    check_tensors(got, gates.state_dict(), f"{where}: the DiffMask gates")


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> Backbone:
    """Load a checkpoint directory as a :class:`Backbone` (eval mode) with ``.config`` attached.

    Methods that store extra tensors (DiffMask probes, …) find them in ``backbone.extra_tensors``.
    """
    config = read_config(path)
    if kind is not None and config["kind"] != kind:
        raise VitlensError(f"{path} is a {config['kind']} checkpoint, but a {kind} checkpoint is needed")
    tensors = load_tensors(path, config)
    where = str(_resolve(Path(path)) / WEIGHTS)
    try:
        module, _ = build_module(config["model"])
    except VitlensError:
        raise
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:  # unknown name, bad kwargs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        model = f"{config['model']['source']}:{config['model']['name']}"
        raise VitlensError(f"{path}: cannot build the model {model} named in {CONFIG} ({first[:200]})") from e
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    stray = [k for k in tensors if not k.startswith(("model.", "extra."))]
    if stray:
        raise VitlensError(f"{where}: unexpected tensors {_few(stray)} (expected model.* and extra.*)")
    check_tensors(state, module.state_dict(), f"{where}: the weights")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # dtype or other mismatch the name/shape check cannot see
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise VitlensError(f"{where}: weights do not match the architecture ({' '.join(lines[1:3])[:300]})") from e
    backbone = adapt(module, Preprocessing.from_dict(config["preprocessing"]), config["classes"])
    if len(config["classes"]) != backbone.num_classes:
        raise VitlensError(
            f"{path}: {CONFIG} lists {len(config['classes'])} classes, but the model has {backbone.num_classes} outputs"
        )
    _check_extras(config, extra, where, len(backbone.blocks))
    backbone.spec = config["model"]
    backbone.config = config
    backbone.extra_tensors = extra
    backbone.checkpoint_path = str(path)
    return backbone.eval()
