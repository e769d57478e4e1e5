"""Shared fixtures: tiny random ViTs of every family and a tiny vitlens checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from vitlens import pretrained
from vitlens.backbones import Preprocessing, adapt
from vitlens.cli import main
from vitlens.models.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
PRETRAINED = pretrained.ROOT  # the models shipped inside the package (vitlens:NAME)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_timm(name: str = "vit_tiny_patch16_224", **kw) -> torch.nn.Module:
    """A small random timm ViT (32 px, patch 8, dim 32, 2 blocks) with any extra timm kwargs."""
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    torch.manual_seed(0)
    return timm.create_model(name, **args).eval()


TIMM_VARIANTS = {
    "vit": {},
    "deit-distilled": {"name": "deit_tiny_distilled_patch16_224"},
    "registers": {"reg_tokens": 4},
    "avg-pool-no-cls": {"class_token": False, "global_pool": "avg"},
    "dynamic-size": {"dynamic_img_size": True},
    "no-embed-class": {"no_embed_class": True},
}


def make_timm(variant: str) -> torch.nn.Module:
    kw = dict(TIMM_VARIANTS[variant])
    return tiny_timm(kw.pop("name", "vit_tiny_patch16_224"), **kw)


@pytest.fixture(params=list(TIMM_VARIANTS))
def timm_variant(request):
    return request.param, adapt(make_timm(request.param))


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 32, 32)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 5-class 32 px timm ViT saved as a vitlens checkpoint."""
    backbone = adapt(tiny_timm(), Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3), classes=list("abcde"))
    backbone.spec = {
        "source": "timm",
        "name": "vit_tiny_patch16_224",
        "kwargs": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5),
    }
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", backbone)


def committed(name: str) -> str:
    """The shipped model ``name`` as its ``vitlens:NAME`` reference (skips if it is not installed)."""
    if not (PRETRAINED / name / "config.json").is_file():
        pytest.skip(f"shipped model {name} not present")
    return f"vitlens:{name}"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in-process: (exit status, stdout, stderr); argparse's own errors exit through SystemExit."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
