"""``vitlens demo``: the embedded default — the fashion models shipped with vitlens (``vitlens:fashion-vit-pm``, …)
on fashion-canvas test images,
scored with ``vitlens evaluate`` and written up as one self-contained HTML report (no network, no training).

What runs is the two tables below: :data:`RUNS` (checkpoint → methods) and :data:`METRIC_GROUPS` (metrics
→ data and number of images). Every (run, group) is one call of the ``evaluate`` driver writing a results
file, and the report is built from those files alone, exactly as ``vitlens report`` does: the numbers in
the report are those of ``vitlens evaluate`` on the same images. ``--train`` first re-creates every
checkpoint from scratch with the commands of :data:`TRAINING` (the ones ``docs/pretrained.md`` documents),
writing them under the output folder.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from . import pretrained
from .errors import VitlensError
from .io import atomic_write, atomic_write_text

# (checkpoint, methods): the seed methods, each on its own model, and the main baselines on the PM-tuned
# classifier (the model whose PM map is shown, so PM and the baselines explain the same decisions).
RUNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fashion-vit-pm", ("pm", "attention", "rollout", "gae", "chefer", "gradcam")),
    ("fashion-vit-diffmask", ("diffmask",)),
    ("fashion-bcos-vit", ("bcos",)),
)
# (name, data, metrics, images): the cheap localisation metrics on many images; the perturbation metrics
# (34 forward passes per image and method) and the sanity check (one randomised explanation per level of
# its cascade: 8 on the four-block models) on fewer, so that the demo stays within 5 minutes on 2 CPU
# cores. The report gives n per metric.
METRIC_GROUPS: tuple[tuple[str, str, tuple[str, ...], int], ...] = (
    ("localisation", "fashion-canvas:test",
     ("pointing-game", "energy-pointing-game", "maxboxacc", "maxboxacc-v2", "top1-loc", "pxap", "miou"), 400),
    ("faithfulness", "fashion-canvas:test",
     ("deletion", "insertion", "positive-perturbation", "negative-perturbation"), 100),
    ("sanity", "fashion-canvas:test", ("sanity",), 64),
    ("grid", "fashion-grid:test", ("grid-pointing-game",), 64),
)  # fmt: skip
GALLERY = 8  # gallery images (from the first group's images)
BATCH_SIZE = 64

# How every checkpoint was made: its commands in order and about how many minutes they take on the
# project's 2-core CPU. docs/pretrained.md quotes this table; `vitlens demo --train` runs it.
TRAINING: dict[str, tuple[tuple[str, ...], int]] = {
    "fashion-vit": (
        (
            "torchrun --standalone --nproc_per_node 2 -m vitlens train classifier --data fashion-canvas:train "
            "--out checkpoints/fashion-vit --epochs 12 --lr 2e-3 --warmup-steps 200 --batch-size 32 --autocast bf16",
        ),
        50,
    ),
    "fashion-vit-pm": (
        (
            "vitlens train pm --model checkpoints/fashion-vit --data fashion-canvas:train "
            "--out checkpoints/fashion-vit-pm --max-steps 4500 --lr 2e-4 --warmup-steps 100 --lambda 10 "
            "--mask-fraction 0.01 --composites 24 --pos-weight 10 --batch-size 88 --autocast bf16",
        ),
        30,
    ),
    "fashion-vit-diffmask": (
        (
            "vitlens train diffmask --model checkpoints/fashion-vit --data fashion-canvas:train "
            "--out checkpoints/fashion-vit-diffmask --max-steps 600 --batch-size 32 --lr 3e-4 --warmup-steps 50",
        ),
        4,
    ),
    "fashion-bcos-vit": (
        (
            "vitlens train bcos --data fashion-canvas:train --out checkpoints/fashion-bcos-vit "
            "--arch bcos_vit_fashion --epochs 5 --batch-size 64 --lr 1e-3 --warmup-steps 200",
        ),
        120,
    ),
}


def checkpoints_dir() -> Path:
    """``$VITLENS_CHECKPOINTS`` or the folder of the models shipped with vitlens."""
    env = os.environ.get("VITLENS_CHECKPOINTS")
    return Path(env) if env else pretrained.ROOT


def model_ref(root: Path, name: str) -> str | Path:
    """How the demo names a model: ``vitlens:NAME`` for a shipped one, its directory otherwise."""
    return f"{pretrained.SCHEME}:{name}" if root == pretrained.ROOT else root / name


def missing_message(name: str, root: Path) -> str:
    command = TRAINING[name][0][-1] if name in TRAINING else "vitlens train …"
    return f"checkpoint {name} missing in {root}: run `vitlens demo --train` or `{command}`"


def needed(names: list[str]) -> list[str]:
    """``names`` and the checkpoints their commands start from, in training order."""
    order: list[str] = []

    def visit(name: str) -> None:
        for cmd in TRAINING[name][0]:
            args = shlex.split(cmd)
            for flag in ("--model", "--init"):
                if flag in args:
                    base = Path(args[args.index(flag) + 1])
                    if base.parent.name == "checkpoints" and base.name in TRAINING:
                        visit(base.name)
        if name not in order:
            order.append(name)

    for n in names:
        visit(n)
    return order


def split_launcher(command: str) -> tuple[list[str], list[str]]:
    """A documented command as (launcher, ``vitlens`` arguments): ``vitlens ARGS`` → ``([], ARGS)``,
    ``torchrun OPTS -m vitlens ARGS`` (several processes) → ``(["torchrun", *OPTS], ARGS)``."""
    args = shlex.split(command)
    if args[:1] == ["vitlens"]:
        return [], args[1:]
    if args[:1] == ["torchrun"] and "-m" in args and args[args.index("-m") + 1 :][:1] == ["vitlens"]:
        m = args.index("-m")
        return args[:m], args[m + 2 :]
    raise ValueError(f"not a vitlens or torchrun … -m vitlens command: {command}")


def training_argv(command: str, root: Path) -> list[str]:
    """A documented command's ``vitlens`` arguments writing under ``root`` (``checkpoints/…`` → ``root/
    checkpoints/…``, ``runs/…`` → ``root/runs/…``), so the committed checkpoints stay as they are."""
    return [str(root / a) if a.startswith(("checkpoints/", "runs/")) else a for a in split_launcher(command)[1]]


def train_checkpoints(root: Path, log: Callable[[str], None]) -> Path:
    """Run every :data:`TRAINING` command the demo needs, each in a process of its own (this interpreter, so
    this installation); returns the folder of the new checkpoints."""
    names = needed([name for name, _ in RUNS])
    minutes = sum(TRAINING[n][1] for n in names)
    log(f"--train: re-creating {', '.join(names)} from scratch: about {minutes} min on a 2-core CPU")
    for name in names:
        for command in TRAINING[name][0]:
            launcher, argv = split_launcher(command)[0], training_argv(command, root)
            line = shlex.join([*launcher, "-m", "vitlens", *argv] if launcher else ["vitlens", *argv])
            log(line)
            runner = ["-m", "torch.distributed.run", *launcher[1:]] if launcher else []
            code = subprocess.call([sys.executable, *runner, "-m", "vitlens", *argv])
            if code != 0:
                raise VitlensError(f"training {name} failed: {line}")
    return root / "checkpoints"


def run_demo(
    out: str | os.PathLike = "demo-out",
    *,
    images: int | None = None,
    gallery: int = GALLERY,
    train: bool = False,
    log: Callable[[str], None] = lambda line: None,
    progress: bool = True,
) -> dict:
    """Evaluate :data:`RUNS` × :data:`METRIC_GROUPS` and write ``out/report.html``; returns a summary.

    ``images`` caps the images of every metric group (default: each group's own number). A checkpoint
    that is missing is reported through ``log`` in one line and left out; with none at all it is an error.
    """
    from .metrics import evaluate
    from .viz.report import build_report, load_results

    out = Path(out)
    root = train_checkpoints(out, log) if train else checkpoints_dir()
    if root != pretrained.ROOT and root.is_absolute() and root.is_relative_to(Path.cwd()):
        root = root.relative_to(Path.cwd())  # the report names checkpoints/NAME, not the full path
    present = [(name, methods) for name, methods in RUNS if (root / name / "config.json").is_file()]
    missing = [name for name, _ in RUNS if not (root / name / "config.json").is_file()]
    for name in missing:
        log(missing_message(name, root))
    if not present:
        raise VitlensError(f"none of the demo's checkpoints ({', '.join(n for n, _ in RUNS)}) is in {root}")
    steps = [(run, group) for run in present for group in METRIC_GROUPS]
    files = []
    for k, ((name, methods), (group, data, metrics, n)) in enumerate(steps, 1):
        limit = min(n, images) if images else n
        log(f"[{k}/{len(steps)}] {name}: {', '.join(methods)} — {group} metrics on {limit} {data} images")
        path = out / "results" / f"{name}.{group}.json"
        evaluate(
            model_ref(root, name), methods, metrics, data, limit=limit, batch_size=BATCH_SIZE, out=path,
            progress=progress, gallery=gallery if group == METRIC_GROUPS[0][0] else 0,
        )  # fmt: skip
        files.append(path)
    page, sheet = build_report([load_results(p) for p in files], title="vitlens demo")
    report = atomic_write_text(out / "report.html", page)
    summary = {"report": str(report), "results": [str(p) for p in files], "missing": missing}
    if sheet is not None:
        atomic_write(out / "gallery.png", lambda tmp: sheet.save(tmp, format="PNG"))
        summary["gallery"] = str(out / "gallery.png")
    return summary
