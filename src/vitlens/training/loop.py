"""The one training loop: CPU, one GPU or many under torchrun; resumable and seeded.

A :class:`Task` (classifier, PM, DiffMask, B-cos) contributes its trainable parameters, its loss and
what it saves; the loop owns data order, schedule, logging, checkpoints and resume. The data order,
augmentation and dropout of step ``s`` depend on ``(seed, s)`` only, so a resumed run follows the
same path as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import DataSpec, collate, parse_data_spec
from ..errors import VitlensError
from ..models.checkpoint import CONFIG, STATE, WEIGHTS, load_training_state, read_config, recover, save_checkpoint
from . import distributed


@dataclass
class TrainConfig:
    """The loop's settings, shared by every ``vitlens train`` command.

    Attributes:
        batch_size: images per step and process.
        lr: peak learning rate.
        weight_decay: AdamW weight decay (not applied to norms, biases, position embeddings and tokens).
        warmup_steps: linear warm-up before the cosine schedule (shortened to half the run if longer).
        epochs: run length in passes over the data (default 1 when ``max_steps`` is not given).
        max_steps: run length in steps; takes precedence over ``epochs``.
        seed: seeds the initial weights, the data order and augmentation.
        checkpoint_every_s: seconds between atomic checkpoints (the training state for ``resume``).
        log_every: steps between lines of ``metrics.jsonl``.
        num_workers: data-loader worker processes.
        grad_clip: maximum gradient norm (``None``: no clipping).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default: cuda when available, else cpu).
        autocast: ``"bf16"`` for mixed precision (float32 weights and optimizer state), ``None`` for float32.
    """

    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    epochs: float | None = None
    max_steps: int | None = None
    seed: int = 0
    checkpoint_every_s: float = 30.0
    log_every: int = 25
    num_workers: int = 0
    grad_clip: float | None = 1.0
    device: str | None = None
    autocast: str | None = None  # "bf16": mixed precision, float32 weights and optimizer

    def total_steps(self, n: int, world: int) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        per_epoch = max(1, n // (self.batch_size * world))
        return max(1, math.ceil((self.epochs if self.epochs is not None else 1.0) * per_epoch))


class Task:
    """What a training method plugs into the loop."""

    kind = "classifier"

    def __init__(self, backbone):
        self.backbone = backbone

    def modules(self) -> torch.nn.Module:
        """The module holding every trainable parameter (wrapped in DDP under torchrun)."""
        return self.backbone

    def parameter_groups(self, cfg: TrainConfig) -> list[dict]:
        decay, no_decay = [], []
        for name, p in self.modules().named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")) else decay).append(p)
        return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        try:
            return torch.optim.AdamW(self.parameter_groups(cfg), lr=cfg.lr, fused=True)  # one kernel for all tensors
        except RuntimeError:  # torch < 2.4 fuses on CUDA only
            return torch.optim.AdamW(self.parameter_groups(cfg), lr=cfg.lr)

    def loss(self, module: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Hook for methods with extra updates (DiffMask's multipliers)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_extras(self) -> tuple[dict, dict]:
        """(extra tensors, extra config) stored in the checkpoint beside the model."""
        return {}, {}


class StepBatches(torch.utils.data.Sampler):
    """Index batches for steps ``start .. total-1``; step ``s`` always gets the same indices."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int, rank: int = 0, world: int = 1):
        self.n, self.b, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.rank, self.world = rank, world
        self.per_epoch = max(1, n // (batch_size * world))

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        perm, epoch = None, -1
        for step in range(self.start, self.total):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = np.random.default_rng([self.seed, e]).permutation(self.n)
            lo = (k * self.world + self.rank) * self.b
            idx = perm[lo : lo + self.b]
            if len(idx) < self.b:  # n smaller than one global batch: wrap around
                idx = np.resize(perm, lo + self.b)[lo:]
            yield idx.tolist()


def fit_warmup(warmup: int, total: int) -> tuple[int, str | None]:
    """The warm-up that fits a ``total``-step run: at most half of it (the rest decays).

    Returns:
        (warm-up steps to use, a one-line note when ``warmup`` was shortened, else ``None``).
    """
    fitted = min(warmup, total // 2)
    if fitted == warmup:
        return warmup, None
    return fitted, (f"note: --warmup-steps {warmup} does not fit a {total}-step run; warming up over {fitted} steps "
                    "(half the run) instead")  # fmt: skip


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 1% then cosine decay to 0."""
    if step < warmup:
        return 0.01 + 0.99 * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def autocasting(cfg: TrainConfig, device: torch.device, backbone) -> Iterator[None]:
    """The forward pass's precision: float32, or bf16 autocast for ``cfg.autocast == "bf16"``.

    On the CPU, bf16 also switches attention to explicit matrix products: PyTorch's bf16 flash-attention
    backward there is ~5× slower than the bf16 matmuls (which use AMX where the CPU has it).
    """
    if cfg.autocast is None:
        yield
        return
    explicit = backbone.unfused_attention() if device.type == "cpu" else contextlib.nullcontext()
    with torch.autocast(device.type, dtype=torch.bfloat16), explicit:
        yield


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # a line cut by a kill
        at = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(at, int | float) and at <= step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


_LOCKS: dict[str, tuple[int, Path]] = {}  # run folder → (open lock file, its path), held by this process
#: Settings a resumed run must share with the run it continues (the data order and schedule follow them).
SAME_ON_RESUME = ("batch_size", "lr", "weight_decay", "warmup_steps", "epochs", "max_steps", "seed", "grad_clip",
                  "autocast")  # fmt: skip


def lock_out(out: str | Path) -> None:
    """Hold ``.NAME.lock`` beside the run folder ``out`` until :func:`release_out` (or the process ends).

    Only the main process of a run (torchrun rank 0, the one that writes) takes it, so a second training
    into the same folder is refused in one line instead of racing the first one's checkpoint swaps.
    """
    out = Path(out)
    key = str(out.absolute())
    if key in _LOCKS or int(os.environ.get("RANK", "0")) != 0:
        return
    file = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise VitlensError(f"{out}: another training is writing into this folder (it holds {file})") from None
            try:
                if os.stat(file).st_ino == os.fstat(fd).st_ino:
                    break  # still the file at that path (not one a finishing run just removed)
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as e:
        raise VitlensError(f"--out {out} cannot be written ({e.strerror or e})") from e
    _LOCKS[key] = (fd, file)


def release_out(out: str | Path) -> None:
    """Give up the lock :func:`lock_out` took (the lock file is removed)."""
    held = _LOCKS.pop(str(Path(out).absolute()), None)
    if held is not None:
        fd, file = held
        with contextlib.suppress(OSError):
            os.unlink(file)
        os.close(fd)


def check_training_out(out: str | Path, resume: bool = False, overwrite: bool = False, lock: bool = True) -> None:
    """Refuse an ``--out`` that cannot take a new run (or, with ``resume``, holds none); with ``lock``, lock it
    (:func:`lock_out`; the caller releases it).

    A folder holding a model is only replaced with ``overwrite``; a folder with files of its own (not a
    vitlens run) never, since a checkpoint replaces its folder whole.
    """
    out = Path(out)
    if out.name in ("", ".", "..") or out.absolute() == Path.cwd():
        raise VitlensError(f"--out {str(out)!r}: name a new folder (a checkpoint replaces its folder whole)")
    if out.exists() and not out.is_dir():
        raise VitlensError(f"--out {out} exists and is not a directory")
    if lock:
        lock_out(out)
    recover(out)  # a kill between the two renames of a checkpoint swap left the last checkpoint aside
    if resume:
        if not (out / STATE).is_file():
            raise VitlensError(f"--resume: no training checkpoint in {out} (missing {STATE})")
        return
    if (out / STATE).exists() and not overwrite:
        raise VitlensError(
            f"{out} already holds a training run: pass --resume to continue it or --overwrite to replace it"
        )
    if (out / CONFIG).exists() and not overwrite:
        raise VitlensError(f"{out} already holds a model: pass --overwrite to replace it, or another --out")
    own = (WEIGHTS, CONFIG, STATE, "metrics.jsonl")
    others = [f.name for f in out.iterdir() if f.name not in own] if out.is_dir() else []
    if others:
        names = ", ".join(sorted(others)[:3])
        raise VitlensError(f"--out {out} holds other files ({names}); give a new or empty folder")


def check_resumable(out: str | Path, data: str | None = None) -> None:
    """``out`` holds a run to resume; ``data`` (a data spec) must be the one it was trained on."""
    check_training_out(out, resume=True, lock=False)  # train() (and the CLI before it) hold the lock
    recorded = (read_config(out).get("training") or {}).get("data")
    if data is not None and recorded is not None and str(recorded) != str(data):
        raise VitlensError(f"--resume: {out} was trained on --data {recorded}, not {data}")


def _check_data_fits(dataset, backbone) -> None:
    """The data's classes and image size must be the model's (else the loss fails mid-run, or is wrong)."""
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) != backbone.num_classes:
        raise VitlensError(f"the data has {len(classes)} classes, but the model has {backbone.num_classes} outputs")
    sample = dataset[0] if len(dataset) else {}
    if "image" in sample and tuple(sample["image"].shape[-2:]) != tuple(backbone.preprocessing.input_size):
        raise VitlensError(f"the data's images are {tuple(sample['image'].shape[-2:])} pixels, but the model takes "
                           f"{tuple(backbone.preprocessing.input_size)}")  # fmt: skip


def _check_same_settings(out: Path, cfg: TrainConfig) -> None:
    """The settings of a resumed run must be those of the run it continues; one line names the changed ones."""
    recorded = (read_config(out).get("training") or {}).get("config")
    if not isinstance(recorded, dict):
        return
    defaults = TrainConfig()
    changed = [f"{k} {recorded.get(k, getattr(defaults, k))} → {getattr(cfg, k)}" for k in SAME_ON_RESUME
               if recorded.get(k, getattr(defaults, k)) != getattr(cfg, k)]  # fmt: skip
    if changed:
        raise VitlensError(f"--resume: settings differ from the run in {out} ({'; '.join(changed)}); "
                           "repeat its command with --resume")  # fmt: skip


def train(
    task: Task,
    dataset: torch.utils.data.Dataset,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    provenance: dict | None = None,
    evaluate=None,
    overwrite: bool = False,
) -> dict:
    """Run the loop; returns the final summary (also stored in the checkpoint's ``training``).

    A new run refuses an ``out`` that holds a model unless ``overwrite``; ``resume`` continues the run in
    ``out`` with the same settings (a changed one is refused).
    """
    out = Path(out)
    held = str(out.absolute()) in _LOCKS  # taken by the caller (the CLI): the caller releases it
    try:
        check_training_out(out, resume, overwrite)
        return _train(task, dataset, out, cfg, resume, provenance, evaluate)
    finally:
        if not held:
            release_out(out)


def _train(task, dataset, out: Path, cfg: TrainConfig, resume: bool, provenance: dict | None, evaluate) -> dict:
    d = distributed.setup(cfg.device)
    total = cfg.total_steps(len(dataset), d.world)
    warmup, note = fit_warmup(cfg.warmup_steps, total)
    cfg = replace(cfg, warmup_steps=warmup)  # the record keeps the schedule that ran
    start, state = 0, None
    if resume:
        _check_same_settings(out, cfg)
        state = load_training_state(out)
        if state["kind"] != task.kind:
            raise VitlensError(f"--resume: {out} holds a {state['kind']} run, not {task.kind}")
        start, total = state["step"], state["total"]

    _check_data_fits(dataset, task.backbone)
    if note and d.main and not resume:
        print(note, file=sys.stderr, flush=True)
    backbone = task.backbone.to(d.device)
    module = task.modules().to(d.device)
    optimizer = task.optimizer(cfg)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    if state is not None:
        try:
            task.load_state_dict(state["task"])
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise VitlensError(f"--resume: {out / STATE} does not fit this model and optimizer ({e!s:.200})") from e
        elapsed0 = state["seconds"]
    else:
        elapsed0 = 0.0
    trainable = any(p.requires_grad for p in module.parameters())
    if d.world > 1 and trainable:
        module = DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    sampler = StepBatches(len(dataset), cfg.batch_size, cfg.seed, start, total, d.rank, d.world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
        persistent_workers=False, pin_memory=d.device.type == "cuda",
    )  # fmt: skip
    log = out / "metrics.jsonl"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(log, start) if resume else log.unlink(missing_ok=True)

    def checkpoint(step: int, seconds: float, summary: dict | None = None) -> None:
        if not d.main:
            return
        extra_tensors, extra_config = task.save_extras()
        training = {**(provenance or {}), "config": asdict(cfg), "step": step, "total_steps": total,
                    "seconds": round(seconds, 1), "world_size": d.world, **(summary or {})}  # fmt: skip
        save_checkpoint(
            out, backbone, kind=task.kind, training=training, extra_tensors=extra_tensors,
            extra_config=extra_config,
            state={"kind": task.kind, "step": step, "total": total, "seconds": seconds,
                   "optimizer": optimizer.state_dict(), "task": task.state_dict()},
        )  # fmt: skip

    module.train()
    t0, last_ckpt, seen = time.time(), time.time(), 0
    bar = tqdm(total=total, initial=start, desc=f"train {task.kind}", disable=not d.main, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 30,
               dynamic_ncols=True)  # fmt: skip
    step = start
    window: list[float] = []
    for batch in loader:
        torch.manual_seed(cfg.seed * 1_000_003 + step * d.world + d.rank)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg.warmup_steps, total)
        batch = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocasting(cfg, d.device, backbone):
            loss, metrics = task.loss(module, batch, step)
        optimizer.zero_grad(set_to_none=True)
        if trainable:
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
        task.after_step(step)
        step += 1
        seen += len(batch["label"]) * d.world
        window.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            rate = seen / max(1e-9, time.time() - t0)
            record = {"step": step, "loss": float(np.mean(window)), "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": round(rate, 1), "seconds": round(elapsed0 + time.time() - t0, 1),
                      **{k: float(v) for k, v in metrics.items()}}  # fmt: skip
            window.clear()
            bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{rate:.0f}")
            if d.main:
                with open(log, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if time.time() - last_ckpt >= cfg.checkpoint_every_s and step < total:
            checkpoint(step, elapsed0 + time.time() - t0)
            last_ckpt = time.time()
    bar.close()
    seconds = elapsed0 + time.time() - t0
    module.eval()
    summary = {"train_seconds": round(seconds, 1)}
    if evaluate is not None:
        summary.update(evaluate(backbone, d))
    checkpoint(step, seconds, summary)
    if d.main:
        with open(log, "a") as f:
            f.write(json.dumps({"step": step, "final": True, **summary}) + "\n")
    distributed.barrier()
    return summary


def held_out_spec(spec: DataSpec, eval_data: str | None) -> DataSpec:
    """The held-out data: ``eval_data`` when given, else the test split of the training data ``spec``."""
    return parse_data_spec(eval_data) if eval_data else DataSpec(spec.name, "test", spec.options, spec.root)


def provenance(spec: DataSpec, held_out: DataSpec | None = None, **more) -> dict:
    """What a checkpoint records about its run: the command, the data (and held-out data) and ``more``."""
    command = "vitlens " + " ".join(sys.argv[1:]) if sys.argv else ""
    held = {"eval_data": str(held_out)} if held_out is not None else {}
    return {"command": command, "data": str(spec), **held, **more}
