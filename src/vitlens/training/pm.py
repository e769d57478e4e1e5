"""PM fine-tuning: cross-entropy on every image + λ · patch-level BCE on the images with masks.

``L = CE(cls_logits, y) + λ · L_pm``. ``L_pm`` is binary cross-entropy over all classes and patches of
the images that carry a mask (or boxes, turned into a box mask): target = the fraction of the patch the
object covers for the true class, 0 for every other class. Only images that carry a mask or a box are
ever supervised: by default all of them, or a fixed, seeded ``mask_fraction`` of the training set drawn
from them (the paper's < 1% setting); ``mask_batch`` of them take the place of ordinary images in every
batch, so a step costs the same as a classifier step. ``composites`` more slots hold 2×2 tiles of four masked
images at half size, each object's patches the target of its own class only: they teach the map to
separate the classes of several objects in one image (no CE on them, no extra labels). Optional
pseudo-mask rounds (self-training) add confidently, correctly classified training images whose current
PM map, thresholded, becomes their target. Confident means a predicted probability of at least
``pseudo_confidence`` (0.9) of the most that label smoothing ε lets a classifier reach, 1 − ε + ε / C: a bar
of 0.9 itself would admit almost no image of a classifier trained with ε = 0.1 (its ceiling is 0.91 for
10 classes).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, boxes_to_mask, patch_coverage
from ..data import collate, open_dataset, parse_data_spec
from ..data.fashion import compose_grid
from ..errors import VitlensError
from ..explainers.pm import patch_probabilities
from .augment import flip_shift
from .classifier import accuracy, held_out_accuracy, prompt_classes
from .loop import Task, TrainConfig, check_resumable, held_out_spec, provenance, train


def pm_targets(masks: torch.Tensor, labels: torch.Tensor, num_classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, C, gh, gw]`` BCE targets: patch coverage of each object's mask for its class, 0 elsewhere.

    ``masks`` ``[B, H, W]`` with ``labels`` ``[B]`` (one object per image), or ``[B, K, H, W]`` with
    ``[B, K]`` (K objects per image, e.g. composites; objects of one class take the larger coverage).
    """
    if masks.dim() == 3:
        masks, labels = masks[:, None], labels[:, None]
    b, k = labels.shape
    coverage = patch_coverage(masks.flatten(0, 1), grid).view(b, k, *grid)
    targets = torch.zeros(b, num_classes, *grid, device=masks.device)
    return targets.scatter_reduce(1, labels[..., None, None].expand(-1, -1, *grid), coverage, reduce="amax")


def pm_loss(patch_logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Mean binary cross-entropy between PM logits ``[B, C, gh, gw]`` and ``targets`` (positives weighted)."""
    weight = 1 + (pos_weight - 1) * targets
    return F.binary_cross_entropy_with_logits(patch_logits, targets, weight=weight)


class PMForward(nn.Module):
    """One forward giving the class logits of all images and the PM logits of the last ``n_masked``.

    The trainable module of the task (wrapped in DDP under torchrun), so both losses' gradients are
    synchronised.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, n_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
        trace = self.backbone.run(images)
        patch_logits = self.backbone.token_logits(trace.patch_tokens[len(images) - n_masked :])
        return trace.logits, trace.to_grid(patch_logits).permute(0, 3, 1, 2)


def negative_loss(patch_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE towards 0 of every class but the label, on every patch (``[B, C, gh, gw]``, ``[B]``).

    What an image-level label says about the patches of a single-object image without a mask: no patch
    shows any other class. The label's own class is left out (where its object lies is unknown).
    """
    other = torch.ones(patch_logits.shape[:2], dtype=torch.bool, device=patch_logits.device)
    other[torch.arange(len(labels)), labels] = False
    return F.softplus(patch_logits[other]).mean()


def peak_component(hard: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
    """The 8-connected component of a thresholded map ``hard`` ``[gh, gw]`` that holds ``volume``'s peak."""
    from scipy import ndimage

    components, _ = ndimage.label(hard.cpu().numpy(), structure=np.ones((3, 3)))
    peak = np.unravel_index(int(volume.argmax()), tuple(volume.shape))
    return torch.from_numpy(components == components[peak]).to(hard) * hard


def is_labelled(sample: dict) -> bool:
    """Whether a sample carries localisation: a mask, or at least one box."""
    return "error" not in sample and ("mask" in sample or len(sample.get("boxes", ())) > 0)


def labelled_indices(dataset) -> list[int]:
    """Indices of the images that carry a mask or a box.

    Data sets that know it cheaply say so with a ``labelled_indices()`` method (every generated data set
    is fully labelled; folder data reads ``localization.txt`` and ``masks/``); any other data set is read
    once.
    """
    if hasattr(dataset, "labelled_indices"):
        return list(dataset.labelled_indices())
    return [i for i in range(len(dataset)) if is_labelled(dataset[i])]


def select_mask_indices(
    labelled: Sequence[int] | int, fraction: float | None, seed: int, n: int | None = None
) -> list[int]:
    """The fixed, seeded subset of labelled images whose masks are used.

    Args:
        labelled: indices of the images with a mask or a box (or their number ``n``: ``range(n)``).
        fraction: ``None`` for all of them, else this share of the ``n`` training images (at least one,
            at most every labelled image), drawn from the labelled ones.
        seed: the run's seed.
        n: the number of training images (default: ``len(labelled)``).

    Returns:
        Sorted indices into the data set.
    """
    labelled = list(range(labelled)) if isinstance(labelled, int) else list(labelled)
    if fraction is None or not labelled:
        return sorted(labelled)
    k = min(len(labelled), max(1, round(fraction * (len(labelled) if n is None else n))))
    pick = np.random.default_rng([seed, 7]).choice(len(labelled), size=k, replace=False)
    return sorted(labelled[j] for j in pick.tolist())


def sample_target_mask(sample: dict) -> torch.Tensor | None:
    """A sample's object mask: its mask, else the union of its boxes; ``None`` when it has neither.

    Boxes that fall outside the image give no mask (``None``): they are never an all-zero target.
    """
    if "error" in sample:
        return None
    if "mask" in sample:
        return sample["mask"].bool()
    boxes = sample.get("boxes")
    if boxes is None or len(boxes) == 0:
        return None
    mask = boxes_to_mask(boxes, tuple(sample["image"].shape[-2:]))
    return mask if mask.any() else None


POOL_BYTES = 512 * 2**20  # masked images kept in memory up to this size; beyond it they are read per step


class PMTask(Task):
    kind = "pm"

    def __init__(
        self,
        backbone: Backbone,
        dataset,
        *,
        mask_fraction: float | None = None,
        labelled: Sequence[int] | None = None,
        lam: float = 10.0,
        pos_weight: float = 1.0,
        mask_batch: int = 8,
        composites: int = 0,
        pseudo_rounds: int = 0,
        pseudo_pool: int = 2000,
        pseudo_threshold: float = 0.5,
        pseudo_confidence: float = 0.9,
        negatives: bool = False,
        total_steps: int = 1,
        seed: int = 0,
        label_smoothing: float = 0.1,
        log: Callable[[str], None] | None = None,
    ):
        super().__init__(backbone)
        self.log = log or (lambda line: None)
        self.net = PMForward(backbone)
        self.dataset, self.lam, self.pos_weight, self.mask_batch = dataset, lam, pos_weight, mask_batch
        self.composites, self.negatives = composites, negatives
        self.label_smoothing, self.seed = label_smoothing, seed
        self.mask_fraction = mask_fraction
        self.labelled = labelled_indices(dataset) if labelled is None else list(labelled)
        self.mask_indices = select_mask_indices(self.labelled, mask_fraction, seed, n=len(dataset))
        self.pseudo_rounds, self.pseudo_pool = pseudo_rounds, pseudo_pool
        self.pseudo_threshold, self.pseudo_confidence = pseudo_threshold, pseudo_confidence
        self.round_steps = {total_steps * (r + 1) // (pseudo_rounds + 1) for r in range(pseudo_rounds)}
        self.grid = backbone.grid_for(backbone.preprocessing.input_size)
        self.pseudo_indices: list[int] = []
        self.pseudo_targets = torch.zeros(0)
        self._load_pool()

    def _load_pool(self) -> None:
        """The masked images: kept in memory when they fit in ``POOL_BYTES``, else read at every step.

        An image that cannot be read or turns out to carry no mask or box is dropped from the pool
        (never trained towards an all-zero target).
        """
        self.pool = None
        h, w = self.backbone.preprocessing.input_size
        if len(self.mask_indices) * (3 * 4 + 1) * h * w > POOL_BYTES:
            return
        images, labels, masks, kept = [], [], [], []
        for i in self.mask_indices:
            sample = self.dataset[i]
            mask = sample_target_mask(sample)
            if mask is None:
                continue
            images.append(sample["image"])
            labels.append(int(sample["label"]))
            masks.append(mask)
            kept.append(i)
        self.mask_indices = kept
        if kept:
            self.pool = {"image": torch.stack(images), "label": torch.tensor(labels), "mask": torch.stack(masks)}

    def _pool_items(self, picks: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, labels and masks of the pool entries ``picks`` (positions in ``mask_indices``)."""
        if self.pool is not None:
            return self.pool["image"][picks], self.pool["label"][picks], self.pool["mask"][picks]
        images, labels, masks = [], [], []
        for p in picks:
            while True:  # an image that fails to read leaves the pool; another one takes its place
                p %= len(self.mask_indices)
                sample = self.dataset[self.mask_indices[p]]
                mask = sample_target_mask(sample)
                if mask is not None:
                    break
                self.mask_indices.pop(p)
                if not self.mask_indices:
                    raise VitlensError("PM: none of the masked images could be read")
                p = int(torch.randint(0, len(self.mask_indices), ()).item())
            images.append(sample["image"])
            labels.append(int(sample["label"]))
            masks.append(mask)
        return torch.stack(images), torch.tensor(labels), torch.stack(masks)

    def _mask_batch(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mask_batch`` images from the real pool and the pseudo-mask pool, with their BCE targets."""
        if not self.mask_indices and not self.pseudo_indices:
            self.pseudo_label_round()  # no real masks (pseudo-masks only): the first round comes first
            if not self.pseudo_indices:
                raise VitlensError(
                    "PM: no labelled images and the pseudo-mask round found no confident, correctly "
                    f"classified image with a map above {self.pseudo_threshold}"
                )
        n_real, n_pseudo = len(self.mask_indices), len(self.pseudo_indices)
        pick = torch.randint(0, n_real + n_pseudo, (self.mask_batch,)).tolist()
        real = [i for i in pick if i < n_real]
        pseudo = [i - n_real for i in pick if i >= n_real]
        parts_img, parts_lab, parts_tgt = [], [], []
        if real:
            images, labels, masks = self._pool_items(real)
            images, masks = flip_shift(images, masks)
            parts_img.append(images)
            parts_lab.append(labels)
            parts_tgt.append(pm_targets(masks.to(device), labels.to(device), self.backbone.num_classes, self.grid))
        samples = [(i, self.dataset[self.pseudo_indices[i]]) for i in pseudo]
        samples = [(i, smp) for i, smp in samples if "error" not in smp]
        if samples:
            keep = [i for i, _ in samples]
            extra = collate([smp for _, smp in samples])
            flip = torch.rand(len(keep)) < 0.5
            img = torch.where(flip[:, None, None, None], extra["image"].flip(-1), extra["image"])
            tgt = self.pseudo_targets[keep]
            tgt = torch.where(flip[:, None, None, None], tgt.flip(-1), tgt)
            parts_img.append(img)
            parts_lab.append(extra["label"])
            parts_tgt.append(tgt.to(device))
        return torch.cat(parts_img).to(device), torch.cat(parts_lab).to(device), torch.cat(parts_tgt)

    def _composite_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``composites`` 2×2 tiles of four pool images each, with every object's target for its class."""
        pick = torch.randint(0, len(self.mask_indices), (4 * self.composites,)).tolist()
        images, labels, masks = self._pool_items(pick)
        images, masks = flip_shift(images, masks)
        tiles, object_masks = compose_grid(images, masks, grid=2)
        labels = labels.view(-1, 4)
        targets = pm_targets(object_masks.to(device), labels.to(device), self.backbone.num_classes, self.grid)
        return tiles.to(device), targets

    def modules(self) -> nn.Module:
        return self.net

    def loss(self, module, batch, step):
        """CE on the ordinary and the masked images, λ · BCE on the masked images and the composites."""
        x, y = flip_shift(batch["image"])[0], batch["label"]
        mx, my, targets = self._mask_batch(x.device)
        parts, n_patch = [mx], len(mx)
        if self.composites and self.mask_indices:
            tiles, tile_targets = self._composite_batch(x.device)
            parts, targets, n_patch = [mx, tiles], torch.cat([targets, tile_targets]), n_patch + len(tiles)
        keep = max(0, len(x) - n_patch)  # masked images and composites replace ordinary ones: same batch size
        n_out = keep + n_patch if self.negatives else n_patch
        logits, patch_logits = module(torch.cat([x[:keep], *parts]), n_out)
        ce = F.cross_entropy(logits[: keep + len(mx)], torch.cat([y[:keep], my]), label_smoothing=self.label_smoothing)
        bce = pm_loss(patch_logits[n_out - n_patch :], targets, self.pos_weight)
        loss, logs = ce + self.lam * bce, {"ce": ce.item(), "pm_bce": bce.item()}
        if self.negatives and keep:
            neg = negative_loss(patch_logits[:keep], y[:keep])
            loss, logs["pm_negatives"] = loss + self.lam * neg, neg.item()
        return loss, logs

    def after_step(self, step: int) -> None:
        if step + 1 in self.round_steps:
            self.pseudo_label_round()

    @torch.no_grad()
    def pseudo_label_round(self) -> None:
        """Threshold the current PM maps of confident, correct, unlabelled images into targets.

        Only the connected region around the map's peak becomes the target: a single-object image has one
        object, and scattered patches above the threshold elsewhere (texture, clutter) are the map's false
        positives, which self-training would otherwise reinforce.
        """
        was = self.backbone.training
        self.backbone.eval()
        rng = np.random.default_rng([self.seed, 11, len(self.pseudo_indices)])
        taken = set(self.mask_indices) | set(self.pseudo_indices)
        candidates = [i for i in rng.permutation(len(self.dataset))[: self.pseudo_pool * 2] if i not in taken]
        device = self.backbone.mean.device
        new_idx, new_targets, looked = [], [], 0
        ceiling = 1 - self.label_smoothing + self.label_smoothing / len(self.backbone.classes)
        bar = self.pseudo_confidence * ceiling
        for start in range(0, min(len(candidates), self.pseudo_pool), 256):
            chunk = candidates[start : start + 256]
            b = collate([self.dataset[i] for i in chunk])
            if "image" not in b:
                continue
            chunk = b["index"].tolist()
            looked += len(chunk)
            trace = self.backbone.run(b["image"].to(device))
            probs = trace.logits.softmax(1)
            conf, pred = probs.max(1)
            ok = (pred.cpu() == b["label"]) & (conf.cpu() >= bar)
            volume = patch_probabilities(self.backbone, trace)
            own = volume[torch.arange(len(pred)), pred]
            hard = (own > self.pseudo_threshold).float()
            for j in torch.nonzero(ok & hard.flatten(1).any(1).cpu()).flatten().tolist():  # never an empty target
                t = torch.zeros_like(volume[j])
                t[b["label"][j]] = peak_component(hard[j], own[j])
                new_idx.append(int(chunk[j]))
                new_targets.append(t.cpu())
        if new_idx:
            self.pseudo_indices += new_idx
            stacked = torch.stack(new_targets)
            self.pseudo_targets = stacked if not len(self.pseudo_targets) else torch.cat([self.pseudo_targets, stacked])
        self.log(
            f"pseudo-mask round: {len(new_idx)} of {looked} unlabelled images added (correctly classified at "
            f"p >= {bar:.3f}, a map above {self.pseudo_threshold}); {len(self.pseudo_indices)} in all"
        )
        self.backbone.train(was)

    def state_dict(self) -> dict:
        return {"pseudo_indices": self.pseudo_indices, "pseudo_targets": self.pseudo_targets}

    def load_state_dict(self, state: dict) -> None:
        self.pseudo_indices = list(state.get("pseudo_indices", []))
        self.pseudo_targets = state.get("pseudo_targets", torch.zeros(0))

    def save_extras(self) -> tuple[dict, dict]:
        return {}, {
            "pm": {
                "mask_fraction": self.mask_fraction,
                "labelled": len(self.labelled),
                **({"mask_indices": self.mask_indices} if len(self.mask_indices) <= 10000 else {}),
                "masks_used": len(self.mask_indices),
                "lambda": self.lam,
                "pos_weight": self.pos_weight,
                "mask_batch": self.mask_batch,
                "composites": self.composites,
                "pseudo_rounds": self.pseudo_rounds,
                "pseudo_labelled": len(self.pseudo_indices),
                "negatives": self.negatives,
            }
        }


# The best fashion-canvas run (run 9 in benchmarks/pm.md): 64 images under cross-entropy per step (56
# ordinary + 8 masked) and 24 composites, λ = 10, positive weight 10, lr 2e-4 with 100 warm-up steps,
# 4,500 steps (about 4.8 epochs of its 60,000 images).
RECIPE = {"ce_images": 64, "composites": 24, "mask_batch": 8, "lam": 10.0, "pos_weight": 10.0, "lr": 2e-4,
          "warmup_steps": 100, "epochs": 4.8, "max_steps": 4500, "min_steps": 500}  # fmt: skip


def pm_settings(n_images: int, n_used: int, n_classes_used: int, given: dict) -> tuple[dict, list[str]]:
    """PM's settings: the flags ``given`` (non-``None`` values), the rest from :data:`RECIPE`, scaled.

    Args:
        n_images: training images.
        n_used: labelled images whose masks are used.
        n_classes_used: classes among them.
        given: ``batch_size``, ``max_steps``, ``epochs``, ``lr``, ``warmup_steps``, ``lam``, ``pos_weight``,
            ``mask_batch``, ``composites``, ``pseudo_rounds``, ``negatives``, each ``None`` when not given
            (``negatives`` defaults to off).

    Returns:
        (settings with every key of ``given`` resolved, except ``epochs``/``max_steps``: exactly one is
        set; one short line per chosen setting saying why).
    """
    s, why = dict(given), []
    r = RECIPE
    if s["composites"] is None:
        if n_used < 8 or n_classes_used < 2:
            s["composites"] = 0
            why.append(f"composites 0: 2×2 composites need 8+ labelled images of 2+ classes ({n_used}, "
                       f"{n_classes_used} classes)")  # fmt: skip
        elif s["batch_size"] is not None:
            s["composites"] = max(1, round(r["composites"] * s["batch_size"] / (r["ce_images"] + r["composites"])))
            why.append(f"composites {s['composites']}: run 9's share of the batch (24 of 88) of --batch-size "
                       f"{s['batch_size']}")  # fmt: skip
        else:
            s["composites"] = r["composites"]
            why.append("composites 24: class separation as in run 9")
    if s["batch_size"] is None:
        s["batch_size"] = r["ce_images"] + s["composites"]
        why.append(f"batch {s['batch_size']}: 64 images under cross-entropy + {s['composites']} composites")
    if s["mask_batch"] is None:
        s["mask_batch"] = r["mask_batch"]
        why.append("8 masked images per step (run 9)")
    if s["max_steps"] is None and s["epochs"] is None:
        ce = max(1, s["batch_size"] - s["composites"])
        natural = round(r["epochs"] * n_images / ce)
        s["max_steps"] = min(r["max_steps"], max(r["min_steps"], natural))
        why.append(f"{s['max_steps']} steps: run 9's 4.8 epochs would be {natural:,} steps of {ce} images, kept "
                   f"within {r['min_steps']:,}..{r['max_steps']:,}")  # fmt: skip
    steps = s["max_steps"] if s["max_steps"] is not None else max(1, round(s["epochs"] * n_images / s["batch_size"]))
    if s["warmup_steps"] is None:
        s["warmup_steps"] = min(r["warmup_steps"], steps // 10)
        why.append(f"{s['warmup_steps']} warm-up steps")
    for key, flag in (("lr", "lr"), ("lam", "lambda"), ("pos_weight", "pos-weight")):
        if s[key] is None:
            s[key] = r[key]
            why.append(f"{flag} {s[key]:g} (run 9)")
    if s["pseudo_rounds"] is None:  # measured on few labels: they lower MaxBoxAccV2 and PxAP (benchmarks/pm.md)
        s["pseudo_rounds"] = 0
    if s.get("negatives") is None:
        s["negatives"] = False
    return s, why


def check_pm_settings(mask_fraction: float | None, composites: int | None) -> None:
    """One-line errors for impossible PM settings."""
    if mask_fraction is not None and not 0 < mask_fraction <= 1:
        raise VitlensError(f"--mask-fraction must be in (0, 1], got {mask_fraction}")
    if composites is not None and composites < 0:
        raise VitlensError(f"--composites must be 0 or more, got {composites}")


def describe_pool(n_images: int, n_labelled: int, n_used: int, mask_fraction: float | None) -> str:
    """The one line on labelled images: how many exist and how many are used."""
    if not n_used:
        how = "none (pseudo-masks only)"
    elif mask_fraction is None:
        how = "all of them"
    else:
        how = f"{n_used:,} (--mask-fraction {mask_fraction:g})"
    return f"{n_labelled:,} of {n_images:,} training images carry a mask or a box; PM uses {how}"


def _labels(dataset, indices: list[int]) -> set[int]:
    """The classes of some images: from the data set's ``label(i)`` when it has one, else by reading them."""
    if hasattr(dataset, "label"):
        return {int(dataset.label(i)) for i in indices}
    return {int(s["label"]) for s in map(dataset.__getitem__, indices) if "error" not in s}


def train_pm(
    model,
    data: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    mask_fraction: float | None = None,
    lam: float | None = None,
    pos_weight: float | None = None,
    mask_batch: int | None = None,
    composites: int | None = None,
    pseudo_rounds: int | None = None,
    negatives: bool | None = None,
    resume: bool = False,
    eval_data: str | None = None,
    overwrite: bool = False,
    classes_from_prompts: bool = False,
    log=None,
) -> dict:
    """``vitlens train pm``: PM fine-tuning of a classifier; reports accuracy before and after.

    Only images that carry a mask or a box are supervised: all of them, or ``mask_fraction`` of the
    training set drawn from them. Every setting left ``None`` (here and in ``cfg``: ``batch_size``,
    ``lr``, ``warmup_steps``, ``max_steps`` with ``epochs``) comes from the best fashion-canvas recipe,
    scaled to the data set (:func:`vitlens.training.pm.pm_settings`); what was chosen and why goes to
    ``log`` (default: stderr, on the main process).

    Args:
        model (str | PathLike): the classifier to fine-tune (URI, ``vitlens:NAME`` or checkpoint directory).
        data: a data spec whose images carry masks or boxes, e.g. ``"folder:/data/birds:train"``.
        out: the checkpoint directory to write.
        cfg: the loop's settings.
        mask_fraction: share of the training set supervised with its mask or box (default: every image
            that has one).
        lam: weight of the patch-level BCE.
        pos_weight: weight of positive (object) patch targets.
        mask_batch: masked images in every batch (they replace ordinary ones).
        composites: 2×2 composites of masked images in every batch (class separation).
        pseudo_rounds: self-training rounds with pseudo-masks.
        negatives: train every ordinary image's patches towards 0 for every class but its label.
        resume: continue the interrupted run in ``out``.
        eval_data: held-out data spec (default: the test split of ``data``).
        overwrite: replace a model already in ``out`` instead of refusing.
        classes_from_prompts: ``model`` is an image–text model (CLIP, SigLIP): its zero-shot classifier over
            the data's class names is the classifier PM fine-tunes (:func:`prompt_classes`).
        log (Callable[[str], None] | None): where the chosen settings are reported (one line each).

    Returns:
        The run's summary (training seconds, held-out accuracy), also stored in the checkpoint.

    Raises:
        VitlensError: no image of ``data`` carries a mask or a box and no pseudo-mask rounds were asked for.
    """
    from dataclasses import replace

    from ..models import load_model
    from ..models.checkpoint import load_checkpoint

    if log is None:
        main = int(os.environ.get("RANK", "0")) == 0

        def log(line: str) -> None:
            if main:
                print(f"vitlens: pm: {line}", file=sys.stderr, flush=True)

    spec = parse_data_spec(data, default_split="train")
    held_out = held_out_spec(spec, eval_data)
    check_pm_settings(mask_fraction, composites)
    if resume:
        check_resumable(out, str(spec))
        backbone = load_checkpoint(out, kind="pm")
        before = backbone.config["training"].get("accuracy_before")
        source = backbone.config["training"].get("base_model")
    else:
        backbone = load_model(model)
        if backbone.spec is None:
            raise VitlensError("PM fine-tuning needs a model loaded from a URI or a vitlens checkpoint")
        before, source = None, str(model)
    dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    if classes_from_prompts and not resume:
        backbone = prompt_classes(backbone, dataset)
    labelled = labelled_indices(dataset)
    if not labelled and not pseudo_rounds:
        raise VitlensError(
            f"{spec}: no training image carries a mask or a box (folder data: boxes in localization.txt or "
            "masks/); PM needs some, or pass --pseudo-masks ROUNDS to train from pseudo-masks alone"
        )
    used = select_mask_indices(labelled, mask_fraction, cfg.seed, n=len(dataset))
    log(describe_pool(len(dataset), len(labelled), len(used), mask_fraction))
    classes_used = len(_labels(dataset, used[:2000]))
    given = {"batch_size": cfg.batch_size, "max_steps": cfg.max_steps, "epochs": cfg.epochs, "lr": cfg.lr,
             "warmup_steps": cfg.warmup_steps, "lam": lam, "pos_weight": pos_weight, "mask_batch": mask_batch,
             "composites": composites, "pseudo_rounds": pseudo_rounds, "negatives": negatives}  # fmt: skip
    settings, why = pm_settings(len(dataset), len(used), classes_used, given)
    if why:
        log("chosen (the best fashion-canvas recipe, run 9 of benchmarks/pm.md, scaled; flags override): "
            + "; ".join(why))  # fmt: skip
    cfg = replace(cfg, **{k: settings[k] for k in ("batch_size", "max_steps", "epochs", "lr", "warmup_steps")})
    if before is None:
        test = open_dataset(held_out, size=backbone.preprocessing.input_size)
        before = round(accuracy(backbone.to(cfg.device or "cpu"), test), 4)
    task = PMTask(
        backbone, dataset, mask_fraction=mask_fraction, labelled=labelled, lam=settings["lam"],
        pos_weight=settings["pos_weight"], mask_batch=settings["mask_batch"], composites=settings["composites"],
        pseudo_rounds=settings["pseudo_rounds"], negatives=settings["negatives"], seed=cfg.seed,
        total_steps=cfg.total_steps(len(dataset), int(os.environ.get("WORLD_SIZE", "1"))), log=log,
    )  # fmt: skip
    record = provenance(spec, held_out, base_model=source, accuracy_before=before)
    return train(task, dataset, out, cfg, resume=resume, provenance=record, evaluate=held_out_accuracy(held_out),
                 overwrite=overwrite)  # fmt: skip
