"""The cost of one training step of PM fine-tuning and of DiffMask, as a ratio to a plain classifier step.

Every task runs the loop's own step on the same batch: ``task.loss`` (augmentation included), zero the
gradients, ``backward``, gradient clipping and ``optimizer.step`` (plus ``after_step``: DiffMask's
multiplier ascent). Each task gets its own copy of the model; the steps are timed interleaved (one
warm-up each, then ``--repeat`` rounds; medians of the per-round ratios), so a shared machine's drifts hit
all of them alike.
The performance issue's target: a PM step costs at most 1.1× a classifier step.

    python benchmarks/train_step.py --model vitlens:fashion-vit --data fashion-canvas:train:n=512 --batch-size 64
    python benchmarks/train_step.py --model 'timm:deit_small_patch16_224?pretrained=0&num_classes=10' \\
        --data fashion-canvas:train:n=256,size=224 --batch-size 16
    python benchmarks/train_step.py --autocast bf16 --cpu-time   # + the float32 classifier step, for the gain

``--profile`` also prints the ``torch.profiler`` operator table of one step of each task.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vitlens import load_model
from vitlens.bench import time_calls
from vitlens.data import collate, open_dataset
from vitlens.training import TrainConfig
from vitlens.training.classifier import ClassifierTask
from vitlens.training.diffmask import DiffMaskTask
from vitlens.training.loop import autocasting
from vitlens.training.pm import PMTask


def make_step(task, cfg: TrainConfig, batch: dict):
    """The loop's step (``vitlens.training.loop.train``) for ``task`` on ``batch``, as a closure."""
    module = task.modules()
    module.train()
    optimizer = task.optimizer(cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    counter = [0]

    def step() -> None:
        torch.manual_seed(counter[0])
        with autocasting(cfg, torch.device("cpu"), task.backbone):
            loss, _ = task.loss(module, batch, counter[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        task.after_step(counter[0])
        counter[0] += 1

    return step


def train_steps(
    model: str,
    data: str,
    batch_size: int,
    repeat: int,
    pm_options: dict,
    profile: bool,
    cpu_time: bool = False,
    autocast: str | None = None,
) -> dict:
    size = load_model(model).preprocessing.input_size
    dataset = open_dataset(data, size=size)
    batch = collate([dataset[i] for i in range(batch_size)])
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v) and k in ("image", "label", "mask", "has_mask")}
    cfg = TrainConfig(batch_size=batch_size, lr=1e-4, autocast=autocast)
    tasks = {
        "classifier": ClassifierTask(load_model(model)),
        "pm": PMTask(load_model(model), dataset, **pm_options),
        "diffmask": DiffMaskTask(load_model(model)),
    }
    steps = {name: make_step(task, cfg, batch) for name, task in tasks.items()}
    if autocast:  # the same classifier step in float32, for the gain
        fp32 = TrainConfig(batch_size=batch_size, lr=1e-4)
        steps["classifier-float32"] = make_step(ClassifierTask(load_model(model)), fp32, batch)
    timed = time_calls(steps, torch.device("cpu"), repeat, clock=time.process_time if cpu_time else time.perf_counter)
    base = timed["classifier"]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as run_profile

        for name, step in steps.items():
            with run_profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            print(f"--- {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return {
        "model": model,
        "data": data,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "repeat": repeat,
        "clock": "process CPU time" if cpu_time else "wall",
        "autocast": autocast,
        "pm_options": pm_options,
        "results": {
            name: {
                "seconds": t.seconds,
                "ratio_to_classifier_step": t.ratio_to(base),
                "peak_mem_mb": t.peak_mb,
                "runs": t.runs,
            }
            for name, t in timed.items()
        },
    }


def markdown(record: dict) -> str:
    step_ms = record["results"]["classifier"]["seconds"] * 1000
    lines = [
        f"`{record['model']}`, batch {record['batch_size']}, CPU ({record['threads']} threads), "
        f"median of {record['repeat']} ({record['clock']}){', bf16 autocast' if record.get('autocast') else ''}; "
        f"classifier step {step_ms:.0f} ms.",
        "",
        "| step | seconds | ratio to a classifier step |",
        "|---|---|---|",
    ]
    for name, r in record["results"].items():
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['ratio_to_classifier_step']:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vitlens:fashion-vit")
    ap.add_argument("--data", default="fashion-canvas:train:n=512")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mask-batch", type=int, default=8, help="PM: masked images in every batch (the task's default)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, process CPU time (a shared machine)")
    ap.add_argument(
        "--autocast", choices=["bf16"], help="steps under the loop's bf16 autocast (+ a float32 classifier step)"
    )
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    if a.cpu_time:
        torch.set_num_threads(1)
    pm_options = {"mask_batch": a.mask_batch}
    rec = train_steps(a.model, a.data, a.batch_size, a.repeat, pm_options, a.profile, a.cpu_time, a.autocast)
    print(markdown(rec) if a.markdown else json.dumps(rec, indent=2))
