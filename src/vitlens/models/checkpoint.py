"""vitlens checkpoints: a directory with ``model.safetensors`` and ``config.json``.

A checkpoint is written whole into a temporary directory and swapped in place, so an interrupted
write (even ``kill -9``) leaves the previous complete checkpoint: readers fall back to it while a swap
is cut short between its two renames, and the next writer finishes the swap.

Loading trusts nothing: ``config.json`` is checked against :data:`SCHEMA` (with a ``format_version``;
files without one are version 1), ``model.safetensors`` against the SHA-256 that ``config.json``
records, and every tensor's name and shape against the architecture before any weight is assigned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._utils import require
from .._version import __version__
from ..backbones import Backbone, Preprocessing, adapt
from ..backbones.base import CheckpointRecord
from ..backbones.bcos_vit import build_bcos
from ..backbones.presets import PRESETS, build_preset
from ..errors import VitlensError
from ..io import atomic_replace_dir
from ..trainables import TRAINABLES

FORMAT = "vitlens-checkpoint"
FORMAT_VERSION = 1
SOURCES = ("preset", "timm", "torchvision", "bcos", "hf", "open_clip")
WEIGHTS, CONFIG, STATE = "model.safetensors", "config.json", "training_state.pt"


def _int(v: object, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(v: object) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_number(x) for x in v)


def _sha(v: object) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


MAX_SIDE = 4096  # pixels of a model input's side
MAX_CLASSES = 100_000
#: Upper bounds of the integer settings a model spec may hold (checked before anything is built, so a
#: small config.json cannot ask for a model that exhausts memory or time).
MODEL_BOUNDS = {
    "depth": 256, "num_hidden_layers": 256, "depths": 256,
    "embed_dim": 16384, "hidden_size": 16384, "dim": 16384,
    "num_heads": 1024, "num_attention_heads": 1024, "heads": 1024,
    "intermediate_size": 131072, "mlp_ratio": 64,
    "img_size": MAX_SIDE, "image_size": MAX_SIDE, "patch_size": MAX_SIDE,
    "num_classes": MAX_CLASSES, "num_labels": MAX_CLASSES, "num_channels": 64, "in_chans": 64,
    "num_register_tokens": 1024, "reg_tokens": 1024,
}  # fmt: skip
#: Hugging Face classes a checkpoint may name (the ones vitlens adapts); nothing else is looked up.
HF_CLASSES = {
    "ViTForImageClassification": "vit",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "SwinForImageClassification": "swin",
    "Swinv2ForImageClassification": "swinv2",
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
    "CLIPModel": "clip",
    "SiglipModel": "siglip",
}


#: Builder arguments that would read other files or fetch weights: never taken from a checkpoint.
MODEL_DENIED = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "weights", "cache_dir")


def check_model_sizes(spec: dict, where: str) -> None:
    """Refuse model settings beyond :data:`MODEL_BOUNDS` (in ``kwargs`` and a Hugging Face ``config``)."""
    for part in ("kwargs", "config"):
        for key, value in (spec.get(part) or {}).items():
            bound = MODEL_BOUNDS.get(key)
            if bound is None:
                continue
            values = value if isinstance(value, list | tuple) else [value]
            if not all(_number(v) and 0 <= v <= bound for v in values):
                raise VitlensError(
                    f"{where}: invalid 'model.{part}.{key}' = {json.dumps(value)[:60]} (expected 0..{bound})"
                )
    for key in ("id2label", "label2id"):
        labels = (spec.get("config") or {}).get(key)
        if labels is not None and (not isinstance(labels, dict) or len(labels) > MAX_CLASSES):
            raise VitlensError(f"{where}: invalid 'model.config.{key}' (expected at most {MAX_CLASSES} labels)")


def _model_bounds(spec: dict, where: str) -> None:
    """A checkpoint's model spec: sizes bounded, no argument naming other files, only allowed HF classes."""
    denied = [k for k in (spec.get("kwargs") or {}) if k in MODEL_DENIED]
    if denied:
        raise VitlensError(f"{where}: 'model.kwargs.{denied[0]}' is not allowed in a checkpoint")
    check_model_sizes(spec, where)
    if spec["source"] == "open_clip":
        from ..backbones.open_clip_vit import check_open_clip_spec

        check_open_clip_spec(spec, where)
    if spec["source"] == "hf":
        expected = HF_CLASSES.get(spec["name"])
        if expected is None:
            raise VitlensError(
                f"{where}: unsupported Hugging Face class {spec['name'][:60]!r} (supported: {', '.join(HF_CLASSES)})"
            )
        if spec["config"].get("model_type") != expected:
            raise VitlensError(
                f"{where}: 'model.config.model_type' is {json.dumps(spec['config'].get('model_type'))[:40]}, "
                f"but {spec['name']} needs {expected!r}"
            )


#: ``config.json``: dotted key → (required, check, what is expected). Parents come before children.
SCHEMA: dict[str, tuple[bool, Callable[[object], bool], str]] = {
    "format": (True, lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": (False, _int, "a positive integer"),
    "kind": (True, lambda v: isinstance(v, str) and v in TRAINABLES, f"one of {', '.join(TRAINABLES)}"),
    "model": (True, lambda v: isinstance(v, dict), "an object"),
    "model.source": (True, lambda v: v in SOURCES, f"one of {', '.join(SOURCES)}"),
    "model.name": (True, lambda v: isinstance(v, str) and v != "", "a model name"),
    "model.kwargs": (False, lambda v: isinstance(v, dict), "an object"),
    "model.config": (False, lambda v: isinstance(v, dict), "an object"),
    "classes": (
        True,
        lambda v: (
            isinstance(v, list) and 0 < len(v) <= MAX_CLASSES and all(isinstance(c, str) and len(c) <= 200 for c in v)
        ),
        f"1 to {MAX_CLASSES} class names of at most 200 characters",
    ),
    "preprocessing": (True, lambda v: isinstance(v, dict), "an object"),
    "preprocessing.input_size": (
        True,
        lambda v: isinstance(v, list) and len(v) == 2 and all(_int(x) and x <= MAX_SIDE for x in v),
        f"[H, W], each 1..{MAX_SIDE}",
    ),
    "preprocessing.mean": (
        True,
        lambda v: _numbers(v) and len(v) <= 64 and max(map(abs, v)) <= 1e3,
        "a list of numbers in [-1000, 1000]",
    ),
    "preprocessing.std": (
        True,
        lambda v: _numbers(v) and len(v) <= 64 and min(v) >= 1e-4 and max(v) <= 1e3,
        "a list of numbers in [1e-4, 1000]",
    ),
    "preprocessing.interpolation": (False, lambda v: isinstance(v, str), "a string"),
    "training": (False, lambda v: isinstance(v, dict), "an object"),
    # image–text models with zero-shot classes: their class embeddings are the extra tensor class_embeddings
    "zero_shot": (False, lambda v: isinstance(v, dict), "an object"),
    "zero_shot.embed_dim": (False, lambda v: _int(v) and v <= 16384, "an integer in 1..16384"),
    "vitlens_version": (False, lambda v: isinstance(v, str), "a string"),
    "weights_sha256": (True, _sha, "a SHA-256 hex digest"),
    "training_state_sha256": (False, _sha, "a SHA-256 hex digest"),
}


def _old(path: Path) -> Path:
    path = Path(os.path.abspath(path))  # "." and "/" have no name of their own
    return path.with_name(f".{path.name}.old") if path.name else path / ".vitlens.old"


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
    if kind not in TRAINABLES:
        raise ValueError(f"kind must be one of {tuple(TRAINABLES)}")
    if backbone.spec is None:
        raise VitlensError("this model has no architecture spec; load it with vitlens.load_model(URI) to save it")
    path = Path(path)
    recover(path)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in backbone.model.state_dict().items()}
    head, head_config = backbone.checkpoint_extras() if hasattr(backbone, "checkpoint_extras") else ({}, {})
    extra_tensors, extra_config = {**head, **(extra_tensors or {})}, {**head_config, **(extra_config or {})}
    tensors.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in extra_tensors.items()})
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
        hashes = {"weights_sha256": _sha256(tmp / WEIGHTS)}
        if state is not None:  # the hash lets --resume refuse a training state that was altered or cut short
            torch.save(state, tmp / STATE)
            hashes["training_state_sha256"] = _sha256(tmp / STATE)
        (tmp / CONFIG).write_text(json.dumps({**config, **hashes}, indent=2) + "\n")
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
    kind = config.get("kind")
    rules = {**SCHEMA, **(TRAINABLES[kind].config if isinstance(kind, str) and kind in TRAINABLES else {})}
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
    _model_bounds(config["model"], where)
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise VitlensError(f"{file}: not valid JSON ({getattr(e, 'msg', e)!s:.100})") from e
    except OSError as e:
        raise VitlensError(f"{file}: cannot read ({e.strerror or e})") from e
    return validate_config(config, str(file))


def load_tensors(path: str | os.PathLike, config: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, refused whole if the file is truncated or corrupted."""
    file = _resolve(Path(path)) / WEIGHTS
    if not file.is_file():
        raise VitlensError(f"{path}: missing {WEIGHTS}")
    expected = (config or read_config(path))["weights_sha256"]
    if _sha256(file) != expected:
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


def _check_extras(config: dict, where: str, blocks: int) -> None:
    """A method's settings must fit the model (DiffMask gates every hidden state); the gates' own tensors
    are checked when the method reads them (``DiffMaskGates.from_checkpoint``)."""
    if config["kind"] == "diffmask" and config["diffmask"]["num_states"] != blocks + 2:
        raise VitlensError(
            f"{where}: 'diffmask.num_states' is {config['diffmask']['num_states']}, but the model has {blocks} "
            f"blocks ({blocks + 2} hidden states)"
        )


def build_module(spec: dict) -> tuple[torch.nn.Module, Preprocessing | None]:
    """Build a randomly initialised module from a checkpoint's ``model`` spec."""
    source, name, kwargs = spec["source"], spec["name"], dict(spec.get("kwargs", {}))
    if source == "preset":
        if name not in PRESETS:
            raise VitlensError(f"unknown architecture preset {name!r} (known: {', '.join(PRESETS)})")
        return build_preset(name, **kwargs)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs), None
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs), None
    if source == "bcos":
        return build_bcos(name, **kwargs)
    if source == "open_clip":
        require("open_clip", extra="clip", what="an OpenCLIP checkpoint")
        from ..backbones.open_clip_vit import build_open_clip

        return build_open_clip(spec), None
    if source == "hf":
        transformers = require("transformers", extra="hf", what="a Hugging Face checkpoint")
        config = transformers.AutoConfig.for_model(**spec["config"])
        return getattr(transformers, name)(config), None
    raise VitlensError(f"unknown model source {source!r} in checkpoint")


def _build(config: dict, path: str | os.PathLike, device: str | None = None) -> torch.nn.Module:
    """The randomly initialised module ``config`` names (on ``device``), or one line saying why not.

    On the ``meta`` device (shapes only), a library whose initialisation reads values (older timm calls
    ``.item()`` while building) is built on the CPU instead.
    """
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            module, _ = build_module(config["model"])
    except VitlensError:
        raise
    except RuntimeError as e:
        if device != "meta" or "meta" not in str(e).lower():  # torch < 2.4 says "Meta tensors"
            raise _build_error(config, path, e) from e
        return _build(config, path)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ImportError,
            NotImplementedError, AssertionError, OverflowError, ZeroDivisionError) as e:  # fmt: skip
        raise _build_error(config, path, e) from e
    return module


def _build_error(config: dict, path: str | os.PathLike, e: Exception) -> VitlensError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    model = f"{config['model']['source']}:{config['model']['name']}"
    return VitlensError(f"{path}: cannot build the model {model} named in {CONFIG} ({first[:200]})")


def load_training_state(path: str | os.PathLike) -> dict:
    """``training_state.pt`` of a run folder, checked against the SHA-256 its ``config.json`` records.

    The file is read as plain tensors and containers (``weights_only``), never as arbitrary pickles, and
    only once its hash matches, so an altered, truncated or foreign file is refused before it is parsed.
    """
    config = read_config(path)
    file = _resolve(Path(path)) / STATE
    expected = config.get("training_state_sha256")
    if expected is None:
        raise VitlensError(f"--resume: {path}/{CONFIG} records no 'training_state_sha256' ({STATE} cannot be checked)")
    if not file.is_file():
        raise VitlensError(f"--resume: no training checkpoint in {path} (missing {STATE})")
    if _sha256(file) != expected:
        raise VitlensError(f"{file} is corrupted: its SHA-256 differs from the one recorded in {CONFIG}")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle protocol: the error below says it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "not a training state"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VitlensError(f"{file} is not a vitlens training state ({first[:200]})") from e
    fields = {"kind": str, "step": int, "total": int, "seconds": float | int, "optimizer": dict, "task": dict}
    bad = [k for k, t in fields.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if bad or not 0 <= state["step"] <= state["total"]:
        raise VitlensError(f"{file} is not a vitlens training state (bad {', '.join(bad) or 'step'})")
    return state


def _zero_shot_backbone(backbone: Backbone, config: dict, extra: dict[str, torch.Tensor], where: str) -> Backbone:
    """An image–text backbone with the zero-shot classes and class embeddings the checkpoint stores."""
    from ..backbones.image_text import ImageTextBackbone

    if not isinstance(backbone, ImageTextBackbone):
        raise VitlensError(f"{where}: 'zero_shot' is set, but {backbone.family} models are not image–text models")
    emb = extra.pop("class_embeddings", None)
    expected = (len(config["classes"]), backbone.embed_dim)
    if emb is None or tuple(emb.shape) != expected:
        got = "missing" if emb is None else f"shape {list(emb.shape)}"
        raise VitlensError(f"{where}: extra.class_embeddings {got}, expected {list(expected)}")
    return backbone.with_classes(config["classes"], emb)


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> Backbone:
    """Load a checkpoint directory as a :class:`Backbone` (eval mode).

    Its :class:`~vitlens.backbones.base.CheckpointRecord` (``backbone.checkpoint``) holds the validated
    ``config.json``, the tensors a method stores beside the weights (DiffMask's gates) and the path.
    """
    config = read_config(path)
    if kind is not None and config["kind"] != kind:
        raise VitlensError(f"{path} is a {config['kind']} checkpoint, but a {kind} checkpoint is needed")
    tensors = load_tensors(path, config)
    where = str(_resolve(Path(path)) / WEIGHTS)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    stray = [k for k in tensors if not k.startswith(("model.", "extra."))]
    if stray:
        raise VitlensError(f"{where}: unexpected tensors {_few(stray)} (expected model.* and extra.*)")
    # The architecture is first built without memory (on the meta device) and compared with the weights,
    # so a config.json asking for a model far larger than its weights costs nothing.
    check_tensors(state, _build(config, path, "meta").state_dict(), f"{where}: the weights")
    module = _build(config, path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # dtype or other mismatch the name/shape check cannot see
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise VitlensError(f"{where}: weights do not match the architecture ({' '.join(lines[1:3])[:300]})") from e
    preprocessing = Preprocessing.from_dict(config["preprocessing"])
    if "zero_shot" in config:  # an image–text model whose classes are text embeddings
        backbone = _zero_shot_backbone(adapt(module, preprocessing), config, extra, where)
    else:
        backbone = adapt(module, preprocessing, config["classes"])
    if len(config["classes"]) != backbone.num_classes:
        raise VitlensError(
            f"{path}: {CONFIG} lists {len(config['classes'])} classes, but the model has {backbone.num_classes} outputs"
        )
    _check_extras(config, where, len(backbone.blocks))
    backbone.spec = config["model"]
    backbone.checkpoint = CheckpointRecord(config, extra, str(path))
    return backbone.eval()
