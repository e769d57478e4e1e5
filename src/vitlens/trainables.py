"""What ``vitlens train`` trains: one registration per trainable model or explanation method.

A registration names the command (which is also the kind its checkpoints record), its training
function, the command's own options and what its checkpoints store beyond the model. The command line
builds ``vitlens train NAME`` from it and the checkpoint reader checks a checkpoint's ``kind`` and
method settings against it. Nothing here imports torch: ``vitlens train --help`` reads it.

Adding a trainable method means writing its task and training function (``vitlens/training/NAME.py``),
its explainer, and one :func:`register_trainable` call below.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .options import non_negative_int, number, positive_int

#: A check of one ``config.json`` value: (required, test, what is expected).
ConfigRule = tuple[bool, Callable[[object], bool], str]


@dataclass(frozen=True)
class Option:
    """One option of ``vitlens train NAME``: the arguments of ``argparse.ArgumentParser.add_argument``."""

    flags: tuple[str, ...]
    settings: dict = field(default_factory=dict)


def option(*flags: str, **settings) -> Option:
    """An :class:`Option`, written like ``parser.add_argument``."""
    return Option(flags, settings)


@dataclass(frozen=True)
class Trainable:
    """A model or method that ``vitlens train`` trains.

    Attributes:
        name: the command (``vitlens train NAME``) and the ``kind`` its checkpoints record.
        summary: one line for ``vitlens train --help``.
        train: ``"module:function"`` of the training function, imported when the command runs. It is
            called as ``function(data=, out=, cfg=, resume=, overwrite=, **options)``, one keyword per
            option's destination, and returns the run's summary.
        options: the command's own options (every command also has the loop's: ``--data``, ``--out``,
            ``--epochs``, ``--lr``, …).
        lr: the command's default peak learning rate; ``None`` leaves ``--batch-size``, ``--lr`` and
            ``--warmup-steps`` unset for the training function to choose.
        length: the run's length when neither ``--epochs`` nor ``--max-steps`` is given (for ``--help``).
        epilog: text after the command's option list.
        config: what the checkpoints store beyond the model: dotted ``config.json`` key → rule.
    """

    name: str
    summary: str
    train: str
    options: tuple[Option, ...] = ()
    lr: float | None = 1e-3
    length: str = "1 epoch"
    epilog: str = ""
    config: dict[str, ConfigRule] = field(default_factory=dict)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's own options to ``parser``."""
        for opt in self.options:
            parser.add_argument(*opt.flags, **opt.settings)

    def option_names(self) -> list[str]:
        """The keyword of every option, as the training function receives it."""
        parser = argparse.ArgumentParser(add_help=False)
        return [parser.add_argument(*opt.flags, **opt.settings).dest for opt in self.options]

    def training_function(self) -> Callable[..., dict]:
        """The training function (imports its module: torch and the training code)."""
        module, _, function = self.train.partition(":")
        return getattr(importlib.import_module(module), function)


TRAINABLES: dict[str, Trainable] = {}


def register_trainable(trainable: Trainable) -> Trainable:
    """Add ``trainable`` to :data:`TRAINABLES` (a name is registered once)."""
    if trainable.name in TRAINABLES:
        raise ValueError(f"trainable {trainable.name!r} is already registered")
    TRAINABLES[trainable.name] = trainable
    return trainable


def _count(low: int, high: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < float("inf")


MODEL_TO_TRAIN = "(URI, vitlens:NAME or checkpoint directory)"
EVAL_DATA = option("--eval-data", help="held-out data spec (default: the test split of --data)")
PROMPTS = option(
    "--classes-from-prompts",
    action="store_true",
    help="--model is an image–text model (open_clip:NAME/TAG, hf: CLIP or SigLIP): its zero-shot classifier over "
    "the data's class names, with the model authors' prompt templates, is the classifier",
)

register_trainable(Trainable(
    "classifier",
    "train a ViT classifier",
    "vitlens.training.classifier:train_classifier",
    options=(
        option("--arch", help="architecture preset (fashion-vit, counting-vit, …) or timm model name (default: the "
               "preset of --data's dataset; for folder data fashion-vit at the images' median side)"),
        EVAL_DATA,
        option("--init", help="start from this model's weights, a second training stage (default: random init)"),
    ),
    lr=3e-4,  # a ViT from scratch on small objects in clutter stays at chance for thousands of steps at 1e-3
    length="from scratch 100 epochs, within 2,000..10,000 steps; 1 epoch with --init",
))  # fmt: skip

register_trainable(Trainable(
    "pm",
    "PM fine-tuning: patch-level mask prediction (Kang et al. 2025)",
    "vitlens.training.pm:train_pm",
    options=(
        option("--model", required=True, help=f"the classifier to fine-tune {MODEL_TO_TRAIN}"),
        option("--mask-fraction", type=number(),
               help="use this share of the training images' masks (default: every labelled image)"),
        option("--lambda", dest="lam", type=number(strict=False), help="weight of the patch-level BCE (default: 10)"),
        option("--pos-weight", type=number(), help="weight of positive (object) patch targets (default: 10)"),
        option("--mask-batch", type=positive_int, help="masked images in every batch (default: 8)"),
        option("--composites", type=non_negative_int,
               help="2×2 composites of masked images in every batch, for class separation "
               "(default: 24, 0 with few labels)"),
        option("--pseudo-masks", dest="pseudo_rounds", type=non_negative_int, metavar="ROUNDS",
               help="self-training rounds (default: 0)"),
        option("--negatives", action=argparse.BooleanOptionalAction,
               help="train the patches of images without a mask towards 0 for every class but the image's label "
               "(default: off)"),
        EVAL_DATA,
        PROMPTS,
    ),
    lr=None,
    length="chosen from the PM recipe for the data set, printed",
    epilog="Unset options follow the best fashion-canvas recipe (benchmarks/pm.md, run 9), scaled to the data set; "
    "the command prints what it chose.",
))  # fmt: skip

register_trainable(Trainable(
    "diffmask",
    "Vision DiffMask gates for a frozen classifier (Nalmpantis et al. 2023)",
    "vitlens.training.diffmask:train_diffmask",
    options=(
        option("--model", required=True, help=f"the frozen classifier {MODEL_TO_TRAIN}"),
        option("--kl-margin", type=number(), default=0.1, help="KL(p_orig || p_masked) allowed, in nats"),
        option("--multiplier-lr", type=number(), default=0.3, help="learning rate of the Lagrange multipliers"),
        PROMPTS,
    ),
    lr=3e-4,  # the gate probes read the raw residual stream: 1e-3 can collapse them
    config={
        "diffmask": (True, lambda v: isinstance(v, dict), "an object"),
        "diffmask.dim": (True, _count(1, 16384), "an integer in 1..16384"),
        "diffmask.num_states": (True, _count(2, 258), "an integer in 2..258"),
        "diffmask.scale": (True, _finite, "a number"),
        "diffmask.offset": (True, _finite, "a number"),
    },
))  # fmt: skip

register_trainable(Trainable(
    "bcos",
    "train a B-cos ViT (Böhle et al. 2024): BCE, Adam, AGC; --weight-decay ignored",
    "vitlens.training.bcos:train_bcos",
    options=(
        option("--arch", help="B-cos architecture: bcos_vit_fashion, simple_vit_ti_patch16_224, … (default: "
               "bcos_vit_fashion for the fashion data sets, required for others)"),
        EVAL_DATA,
    ),
))  # fmt: skip
