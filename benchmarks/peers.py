"""vitlens beside captum and pytorch-grad-cam: same model, same inputs, same machine, one run.

Every figure is a ratio to one plain forward pass of the same batch, timed in the same process and
interleaved with it (one warm-up each, then ``--repeat`` rounds of one call each; medians of the per-round
ratios), so the numbers
compare across machines and a shared machine's drifts hit both libraries alike. Run:
``python benchmarks/peers.py [--model URI] [--batch-size N] [--steps S] [--occlusion-window K]``;
``--markdown`` prints the table for ``benchmarks/RESULTS.md``.

Occlusion slides a ``K × K``-patch window with a stride of one patch in both libraries (captum:
``sliding_window_shapes=(3, K·p, K·p)``, ``strides=(3, p, p)``): ``(g − K + 1)²`` occluded copies of every
image. ``K = 1`` (every patch) suits small grids; at 224 px (14 × 14 patches) ``K = 10`` (25 windows)
keeps the comparison to minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vitlens import load_model
from vitlens.bench import time_calls
from vitlens.explainers import get_explainer


def peers(
    model: str,
    batch_size: int,
    steps: int,
    repeat: int,
    window: int = 1,
    chunk: int = 64,
    cpu_time: bool = False,
    device: str = "cpu",
) -> dict:
    from captum.attr import InputXGradient, IntegratedGradients, Occlusion
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    dev = torch.device(device)
    bb = load_model(model).to(dev).eval()  # parameters keep requires_grad=True, as users run the peers
    size = bb.preprocessing.input_size
    images = torch.rand(batch_size, 3, *size, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        target = bb(images).argmax(1)
    ph, pw = bb.patch_size
    prefix = bb.num_prefix_tokens
    gh, gw = bb.grid_for(size)

    def reshape(t: torch.Tensor) -> torch.Tensor:  # tokens → [B, D, gh, gw] for pytorch-grad-cam
        return t[:, prefix:].reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2)

    cam = GradCAM(model=bb, target_layers=[bb.attention_norm(len(bb.blocks) - 1)], reshape_transform=reshape)
    cam_targets = [ClassifierOutputTarget(int(t)) for t in target]
    ig, ixg = IntegratedGradients(bb), InputXGradient(bb)
    occ = Occlusion(bb)
    pairs = {
        "Integrated Gradients": (
            lambda: get_explainer("ig", bb, steps=steps, internal_batch_size=chunk)(images, target),
            lambda: ig.attribute(images, target=target, n_steps=steps, internal_batch_size=chunk),
        ),
        "Input×Gradient": (
            lambda: get_explainer("inputxgrad", bb)(images, target),
            lambda: ixg.attribute(images.clone().requires_grad_(True), target=target),
        ),
        "Occlusion": (
            lambda: get_explainer("occlusion", bb, fill=0.0, window=window, internal_batch_size=chunk)(images, target),
            lambda: occ.attribute(images, target=target, sliding_window_shapes=(3, window * ph, window * pw),
                                  strides=(3, ph, pw), baselines=0.0, perturbations_per_eval=chunk // batch_size or 1),
        ),
        "Grad-CAM": (
            lambda: get_explainer("gradcam", bb)(images, target),
            lambda: cam(input_tensor=images, targets=cam_targets),
        ),
    }  # fmt: skip

    def forward() -> None:
        with torch.no_grad():
            bb(images)

    calls = {"forward": forward}
    for name, (ours, theirs) in pairs.items():
        calls[f"{name}/vitlens"], calls[f"{name}/peer"] = ours, theirs
    clock = time.process_time if cpu_time else time.perf_counter
    timed = time_calls(calls, dev, repeat, clock=clock)
    forward_s = timed["forward"].seconds
    rows = {}
    for name in pairs:
        ours_t, theirs_t = timed[f"{name}/vitlens"], timed[f"{name}/peer"]
        rows[name] = {"vitlens": ours_t.ratio_to(timed["forward"]), "peer": theirs_t.ratio_to(timed["forward"]),
                      "speedup": theirs_t.ratio_to(ours_t)}  # fmt: skip
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"model": model, "device": name, "batch_size": batch_size, "ig_steps": steps, "occlusion_window": window,
            "occlusion_windows": (gh - window + 1) * (gw - window + 1), "internal_batch_size": chunk,
            "forward_s": forward_s, "repeat": repeat, "clock": "process CPU time" if cpu_time else "wall",
            "threads": torch.get_num_threads(), "results": rows}  # fmt: skip


def markdown(record: dict) -> str:
    lines = [
        f"`{record['model']}`, batch {record['batch_size']}, {record['device']}, "
        f"forward {record['forward_s'] * 1000:.0f} ms ({record['clock']}), median of {record['repeat']} "
        f"interleaved rounds; IG with "
        f"{record['ig_steps']} steps; occlusion with a {record['occlusion_window']}×{record['occlusion_window']}-patch "
        f"window ({record['occlusion_windows']} positions); internal batches of {record['internal_batch_size']}. "
        "Ratios to one forward pass.",
        "",
        "| method | vitlens | peer | peer library | vitlens speed-up |",
        "|---|---|---|---|---|",
    ]
    lib = {"Grad-CAM": "pytorch-grad-cam"}
    for name, r in record["results"].items():
        lines.append(
            f"| {name} | {r['vitlens']:.2f}× | {r['peer']:.2f}× | {lib.get(name, 'captum')} | {r['speedup']:.2f}× |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="timm:deit_small_patch16_224?pretrained=0")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--occlusion-window", type=int, default=1, help="occlusion window in patches (stride one patch)")
    ap.add_argument("--internal-batch-size", type=int, default=64)
    ap.add_argument("--cpu-time", action="store_true", help="one thread, process CPU time (a shared machine)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    if a.cpu_time:
        torch.set_num_threads(1)
    rec = peers(
        a.model, a.batch_size, a.steps, a.repeat, a.occlusion_window, a.internal_batch_size, a.cpu_time, a.device
    )
    print(markdown(rec) if a.markdown else json.dumps(rec, indent=2))
