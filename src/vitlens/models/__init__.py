"""Models by name: :func:`load_model` turns a URI, a shipped model or a checkpoint into a :class:`Backbone`.

Model URIs::

    timm:NAME[?pretrained=0&key=value...]      timm.create_model(NAME, **kwargs); pretrained by default
    hf:NAME_OR_PATH[?embedding=cls|mean&...]  transformers AutoModelForImageClassification (ViT, DeiT, DINOv2,
                                               Swin); CLIPModel and SiglipModel with their tokenizer; AutoModel
                                               for a checkpoint without a classifier head (output: an embedding)
    open_clip:NAME/TAG[?pretrained=0]          open_clip.create_model(NAME, pretrained=TAG); also
                                               open_clip:hf-hub:ORG/REPO and open_clip:/local/dir
    torchvision:NAME[?pretrained=0&key=value]  torchvision.models.get_model(NAME, weights=...)
    bcos:NAME[?weights=PATH&pretrained=1&key=value]  vitlens' B-cos ViT; official B-cos-v2 weights load unchanged
    vitlens:NAME                               a model shipped with vitlens (``vitlens models`` lists them)
    PATH                                       a vitlens checkpoint directory

This layer sits above :mod:`vitlens.backbones` (which only adapts modules) and below the explainers.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator

import torch
from torch import nn

from .._utils import require
from ..backbones import Backbone, adapt
from ..backbones.base import check_embedding
from ..backbones.bcos_vit import load_bcos
from ..backbones.hf_dinov2 import HFDinov2, dinov2_preprocessing, is_hf_dinov2
from ..backbones.hf_vit import HFViT, hf_preprocessing, is_hf_vit
from ..errors import VitlensError
from ..options import parse_options

__all__ = ["SCHEMES", "check_device", "load_model", "parse_model_uri"]

SCHEMES = ("timm", "hf", "torchvision", "bcos", "vitlens", "open_clip")
EXPECTED = (
    "expected timm:NAME, hf:NAME_OR_PATH, torchvision:NAME, bcos:NAME, open_clip:NAME/TAG, vitlens:NAME or a "
    "vitlens checkpoint directory"
)

#: ``hf:`` URI options passed on to ``from_pretrained``; nothing else is (no ``trust_remote_code``: a folder's
#: own Python code runs only with the environment variable ``VITLENS_TRUST_REMOTE_CODE=1``).
HF_OPTIONS = ("revision", "subfolder", "local_files_only", "num_labels", "ignore_mismatched_sizes")
#: ``hf:`` URI options vitlens reads itself: ``embedding`` (``cls`` or ``mean``), the output of a model without
#: a classifier head.
HF_OWN_OPTIONS = ("embedding",)
#: Options of ``from_pretrained`` that also apply to ``AutoConfig`` / ``AutoImageProcessor``.
HF_HUB_OPTIONS = ("revision", "subfolder", "local_files_only")


def trust_remote_code() -> bool:
    """Whether the user allowed Hugging Face models to run their own code (``VITLENS_TRUST_REMOTE_CODE=1``)."""
    return os.environ.get("VITLENS_TRUST_REMOTE_CODE", "") == "1"


def parse_model_uri(uri: str) -> tuple[str, str, dict]:
    """``"timm:vit_small_patch16_224?pretrained=0&num_classes=10"`` → ("timm", name, kwargs)."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in SCHEMES:
        raise VitlensError(f"unknown model {uri!r}: {EXPECTED}")
    name, _, query = rest.partition("?")
    if not name.strip():
        raise VitlensError(f"model URI {uri!r} names no model")
    kwargs = parse_options(filter(None, query.split("&")), what=f"option in model URI {uri!r}")
    if "pretrained" in kwargs:
        flag = kwargs["pretrained"]
        if flag not in (0, 1):  # 0, 1, true, false (parse_value gives True/False for the words)
            raise VitlensError(f"pretrained={flag} in model URI {uri!r}: expected 0, 1, true or false")
        kwargs["pretrained"] = bool(flag)
    return scheme, name, kwargs


def _load_uri(uri: str, options: dict) -> Backbone:
    from .checkpoint import check_model_sizes

    scheme, name, kwargs = parse_model_uri(uri)
    kwargs.update(options)
    if scheme == "vitlens":
        from ..pretrained import path
        from .checkpoint import load_checkpoint

        if kwargs:
            raise VitlensError(f"{uri}: a vitlens model takes no options (got {', '.join(sorted(kwargs))})")
        return load_checkpoint(path(name))
    check_model_sizes({"kwargs": kwargs}, f"model URI {uri!r}")  # depth, sizes, classes: bounded before building
    try:
        if scheme == "bcos":
            backbone = load_bcos(name, **kwargs)
        elif scheme == "open_clip":
            backbone = _load_open_clip(uri, name, kwargs)
        elif scheme == "timm":
            import timm

            pretrained = kwargs.pop("pretrained", True)
            if name not in timm.list_models() and name not in timm.list_pretrained():
                raise VitlensError(f"unknown timm model {name!r}")
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
            backbone = adapt(model)
            backbone.spec = {"source": "timm", "name": name, "kwargs": kwargs}
        elif scheme == "torchvision":
            import torchvision

            pretrained = kwargs.pop("pretrained", True)
            if name not in torchvision.models.list_models():
                raise VitlensError(f"unknown torchvision model {name!r}")
            model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
            backbone = adapt(model)
            backbone.spec = {"source": "torchvision", "name": name, "kwargs": kwargs}
        else:
            transformers = require("transformers", extra="hf", what=uri)
            unknown = sorted(set(kwargs) - set(HF_OPTIONS) - set(HF_OWN_OPTIONS))
            if unknown:
                hint = (
                    " (set VITLENS_TRUST_REMOTE_CODE=1 to run a model's own code)"
                    if "trust_remote_code" in unknown
                    else ""
                )
                allowed = ", ".join(HF_OPTIONS + HF_OWN_OPTIONS)
                raise VitlensError(f"option {', '.join(unknown)} not allowed in an hf: URI (allowed: {allowed}){hint}")
            backbone = _load_hf(transformers, name, kwargs)
    except VitlensError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AssertionError, AttributeError, ImportError,
            EOFError, pickle.UnpicklingError) as e:  # download, config, kwargs, a pickle refused  # fmt: skip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitlensError(f"could not load {uri}: {first[:200]}") from e
    return backbone


def _load_hf(transformers, name: str, kwargs: dict) -> Backbone:
    """An ``hf:`` model through transformers' own Auto classes (no remote code unless the user allowed it).

    The checkpoint's config says which: an ``…ForImageClassification`` architecture (or ``num_labels`` in
    the URI) loads with ``AutoModelForImageClassification``, anything else with ``AutoModel`` (a model
    without a classifier head, whose output is an embedding: ``embedding=cls|mean``). Only the classes
    vitlens adapts are accepted.
    """
    chosen = "embedding" in kwargs
    embedding = check_embedding(kwargs.pop("embedding", "cls"))  # before anything is read
    remote = {"trust_remote_code": trust_remote_code()}
    hub = {k: v for k, v in kwargs.items() if k in HF_HUB_OPTIONS}
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar for a local load
    try:
        image_text = _load_hf_image_text(transformers, name, kwargs, remote)
        if image_text is not None:
            if chosen:
                raise VitlensError(
                    "embedding= does not apply to image–text models (their output is the image embedding)"
                )
            return image_text
        config = transformers.AutoConfig.from_pretrained(name, **hub, **remote)
        archs = getattr(config, "architectures", None) or []
        classify = "num_labels" in kwargs or any("ForImageClassification" in a for a in archs)
        auto = transformers.AutoModelForImageClassification if classify else transformers.AutoModel
        model = auto.from_pretrained(name, **kwargs, **remote)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    own = is_hf_vit(model) or is_hf_dinov2(model)  # the families with an embedding choice
    if not own:
        adapt(model)  # raises: not a supported Vision Transformer
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name, **hub, **remote)
    except (OSError, ValueError):
        processor = None
    if is_hf_vit(model):
        backbone = HFViT(model, hf_preprocessing(model, processor), embedding=embedding)
    elif is_hf_dinov2(model):
        backbone = HFDinov2(model, dinov2_preprocessing(model, processor), embedding=embedding)
    elif chosen:
        raise VitlensError(f"embedding= applies to ViT, DeiT and DINOv2 models, not {type(model).__name__}")
    else:  # Swin: its own pooling
        backbone = adapt(model, hf_preprocessing(model, processor))
    if chosen and not backbone.headless:
        raise VitlensError("embedding= applies to models without a classifier head; this one has one")
    backbone.spec = {"source": "hf", "name": type(model).__name__, "config": model.config.to_dict()}
    return backbone


def _load_open_clip(uri: str, name: str, kwargs: dict) -> Backbone:
    """``open_clip:NAME/TAG`` (a pretrained tag of ``open_clip.list_pretrained()``), ``open_clip:hf-hub:ORG/REPO``
    or ``open_clip:DIR`` (a folder with ``open_clip_config.json`` and weights); ``?pretrained=0``: random weights."""
    open_clip = require("open_clip", extra="clip", what=uri)
    from ..backbones.open_clip_vit import OpenCLIPViT, open_clip_spec

    pretrained = kwargs.pop("pretrained", True)
    if kwargs:
        raise VitlensError(f"option {', '.join(sorted(kwargs))} not allowed in an open_clip: URI (allowed: pretrained)")
    tag = None
    if name.startswith("hf-hub:"):
        model_name = name
    elif os.path.isdir(name):
        model_name = f"local-dir:{name}"
    else:
        model_name, _, tag = name.partition("/")
        if model_name not in open_clip.list_models():
            raise VitlensError(f"unknown OpenCLIP model {model_name!r} (see open_clip.list_models())")
        if pretrained and not tag:
            tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
            tags = ", ".join(tags[:6]) + (", …" if len(tags) > 6 else "") if tags else "none"
            raise VitlensError(f"{uri}: name the pretrained weights, {model_name}/TAG (tags: {tags}) or ?pretrained=0")
        if pretrained and (model_name, tag) not in set(open_clip.list_pretrained()):
            raise VitlensError(f"unknown OpenCLIP pretrained tag {tag!r} for {model_name}")
    model = open_clip.create_model(model_name, pretrained=tag if pretrained else None, pretrained_hf=False,
                                   pretrained_image=False, load_weights=pretrained, weights_only=True)  # fmt: skip
    model.eval()
    backbone = OpenCLIPViT(model, tokenizer=open_clip.get_tokenizer(model_name))
    backbone.spec = open_clip_spec(model, open_clip.get_model_config(model_name))
    return backbone


def _load_hf_image_text(transformers, name: str, kwargs: dict, remote: dict) -> Backbone | None:
    """``hf:`` URIs of CLIP and SigLIP models, with their image processor and tokenizer; ``None`` for others."""
    from ..backbones.hf_clip import HFCLIP
    from ..backbones.hf_siglip import HFSiglip

    options = {k: v for k, v in kwargs.items() if k in ("revision", "subfolder", "local_files_only")}
    config = transformers.AutoConfig.from_pretrained(name, **options, **remote)
    classes = {"clip": (transformers.CLIPModel, HFCLIP), "siglip": (transformers.SiglipModel, HFSiglip)}
    if getattr(config, "model_type", None) not in classes:
        return None
    model_class, adapter = classes[config.model_type]
    ignored = sorted(set(kwargs) - set(options))
    if ignored:
        raise VitlensError(f"option {', '.join(ignored)} does not apply to {config.model_type} image–text models")
    model = model_class.from_pretrained(name, **options)  # transformers' own classes: never a model's own code
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name, **options)
    except (OSError, ValueError):
        processor = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **options)
    except Exception:  # noqa: BLE001 - optional: no tokenizer files, sentencepiece missing (SigLIP), …
        tokenizer = None  # zero_shot and TextPrompt then ask for tokenizer= in one line
    if tokenizer is not None and len(tokenizer) <= len(tokenizer.all_special_tokens):
        tokenizer = None  # built from no vocabulary file: special tokens only
    backbone = adapter(model.eval(), tokenizer=tokenizer, image_processor=processor)
    backbone.spec = {"source": "hf", "name": type(model).__name__, "config": model.config.to_dict()}
    return backbone


HUB_HOST = "huggingface.co"
OFFLINE_HELP = (
    "without a network, load weights from disk: hf:/path/to/saved/model, open_clip:/path/to/dir, "
    "bcos:NAME?weights=PATH, a vitlens checkpoint directory, or models already in the Hugging Face / torch hub "
    "cache (HF_HUB_OFFLINE=1)"
)


def hub_reachable(host: str = HUB_HOST) -> bool:
    """Whether the model hub's host name resolves (a lookup, no connection): fails at once without a network."""
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Hugging Face Hub calls answered from the local cache only (no retries against an unreachable hub)."""
    try:
        import huggingface_hub.constants as hub
    except ImportError:  # pragma: no cover - timm and transformers depend on it
        yield
        return
    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def _load_uri_offline_aware(uri: str, options: dict) -> Backbone:
    """:func:`_load_uri`, answered from local files within seconds when the hub cannot be reached."""
    asked = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if uri.partition(":")[0] == "vitlens" or (not asked and hub_reachable()):  # named models never download
        return _load_uri(uri, options)
    with offline_hub():
        try:
            return _load_uri(uri, options)
        except VitlensError as e:
            if not _missing_files(e):  # a wrong option or name, not weights the hub would have sent
                raise
            raise VitlensError(f"{e} — {'HF_HUB_OFFLINE is set' if asked else 'no network'}: {OFFLINE_HELP}") from e


def _missing_files(error: BaseException) -> bool:
    """Whether ``error`` comes from a file that could not be read or fetched (an ``OSError`` in its chain:
    the hub's connection and cache-miss errors are ``OSError`` subclasses)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_model(model: str | os.PathLike | nn.Module | Backbone, device=None, **options) -> Backbone:
    """Any supported model, URI or vitlens checkpoint directory → a :class:`Backbone`.

    ``"vitlens:NAME"`` loads a model shipped with the package (``vitlens models`` lists them), e.g.
    ``load_model("vitlens:fashion-vit-pm")``.

    Models loaded from a URI or checkpoint are put in eval mode; a module passed in keeps its mode.

    Args:
        model: a model URI (``timm:NAME[?key=value&…]``, ``hf:NAME_OR_PATH``, ``torchvision:NAME``,
            ``bcos:NAME``, ``vitlens:NAME``), a vitlens checkpoint directory, a timm / Hugging Face /
            torchvision ViT module (compiled, ``DataParallel``-wrapped and ``Sequential(Normalize, vit)``
            modules are unwrapped) or a :class:`Backbone` (returned as is).
        device (str | torch.device | None): move the model there (``"cpu"``, ``"cuda"``, ``"cuda:N"``);
            default: where it is.
        **options (object): URI options given as keywords (``load_model("bcos:NAME", weights=PATH)``).

    Returns:
        The :class:`Backbone`: a ``torch.nn.Module`` whose forward takes images in [0, 1] and returns
        logits, with the model's ``classes``, ``preprocessing`` and patch grid.

    Raises:
        VitlensError: an unknown model or URI, an unsupported architecture, a missing extra, a missing
            device, or a checkpoint that fails its checks (one line saying which).

    Examples:
        >>> model = vitlens.load_model("vitlens:fashion-vit")
        >>> model = vitlens.load_model("timm:vit_small_patch16_224?pretrained=0&num_classes=10")
        >>> model = vitlens.load_model(my_timm_vit)  # the same module and weights, seen by vitlens
    """
    if options and not (isinstance(model, str | os.PathLike) and os.fspath(model).partition(":")[0] in SCHEMES):
        raise VitlensError(f"options {', '.join(sorted(options))} only apply to a model URI")
    if isinstance(model, nn.Module):
        backbone = adapt(model)
    elif isinstance(model, str | os.PathLike):
        from .checkpoint import is_checkpoint_dir, load_checkpoint

        text = os.fspath(model)
        if not text.strip():
            raise VitlensError("empty model name: expected a model URI or a vitlens checkpoint directory")
        if is_checkpoint_dir(text):
            backbone = load_checkpoint(text)
        elif text.partition(":")[0] in SCHEMES:
            backbone = _load_uri_offline_aware(text, options)
        else:
            if os.path.exists(text):
                what = f"{text!r} is a file, not a model"
            elif os.sep in text or text.startswith("."):
                what = f"no such checkpoint directory {text!r}"
            else:
                what = f"unknown model {text!r}"
            raise VitlensError(f"{what}: {EXPECTED}")
        backbone.eval()
    else:
        raise VitlensError(f"cannot load a model from a {type(model).__name__}")
    return backbone.to(check_device(device)) if device is not None else backbone


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, or a one-line error for an unknown or missing one."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise VitlensError(f"unknown device {device!r} (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VitlensError(f"device {device}: no CUDA device is available (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VitlensError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise VitlensError(f"device {device}: MPS is not available (use cpu)")
    return dev
