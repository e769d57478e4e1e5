"""Compatibility with the official B-cos-v2 ViTs (github.com/B-cos/B-cos-v2, PyPI ``bcos``).

The official models are ``BcosSequential(SimpleViT, LogitLayer)``, so their state dict keys carry a ``0.``
prefix; the parameter names below it are the ones :class:`~vitlens.bcos.vit.BcosSimpleViT` uses. The
release URLs are those of ``bcos.models.pretrained.URLS["vit_final"]`` (bcos 0.1.3); the file names end in
the first hex digits of the file's SHA-256, which ``torch.hub`` checks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import VitlensError
from .vit import BcosSimpleViT

BASE = "https://github.com/B-cos/B-cos-v2/releases/download/v0.0.1-weights"
URLS: dict[str, str] = {
    "simple_vit_ti_patch16_224": f"{BASE}/bcos_simple_vit_ti_patch16_224-4b0824b1c1.pth",
    "simple_vit_s_patch16_224": f"{BASE}/bcos_simple_vit_s_patch16_224-75e99d1f73.pth",
    "simple_vit_b_patch16_224": f"{BASE}/bcos_simple_vit_b_patch16_224-1fc4750806.pth",
    "simple_vit_l_patch16_224": f"{BASE}/bcos_simple_vit_l_patch16_224-9613b2ad0a.pth",
    "vitc_ti_patch1_14": f"{BASE}/bcos_vitc_ti_patch1_14-ddd6193a77.pth",
    "vitc_s_patch1_14": f"{BASE}/bcos_vitc_s_patch1_14-cf55c88f0c.pth",
    "vitc_b_patch1_14": f"{BASE}/bcos_vitc_b_patch1_14-a13c46397b.pth",
    "vitc_l_patch1_14": f"{BASE}/bcos_vitc_l_patch1_14-8739e18b8d.pth",
}
#: Prefixes a saved official model may carry: DDP / Lightning wrappers and the BcosSequential index.
PREFIXES = ("module.", "model.", "0.")


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official B-cos-v2 ViT state dict (or a training checkpoint holding one) → vitlens' keys."""
    for container in ("state_dict", "model"):
        if isinstance(state.get(container), Mapping):
            state = state[container]
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def load_state_dict(model: BcosSimpleViT, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Load an official (or vitlens) state dict into ``model`` strictly; a one-line error on a mismatch."""
    try:
        model.load_state_dict(convert_state_dict(state), strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise VitlensError(f"{source} do not fit this B-cos ViT ({' '.join(lines[1:3])[:300]})") from e


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt`` file (tensors only) or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise VitlensError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / format errors of a user-provided file
        raise VitlensError(f"cannot read weights from {path}: {str(e).strip().splitlines()[0][:200]}") from e


def download_weights(name: str) -> dict[str, torch.Tensor]:
    """The official release weights of architecture ``name`` (cached by ``torch.hub``, hash checked)."""
    if name not in URLS:
        raise VitlensError(f"no official B-cos weights for {name!r} (available: {', '.join(URLS)})")
    return torch.hub.load_state_dict_from_url(URLS[name], map_location="cpu", progress=False, check_hash=True)
