"""Compare explanation methods on the same images: one figure, rows images, columns methods.

Uses the named model vitlens:fashion-vit-pm (shipped with vitlens, offline) and fashion-canvas test
images. Prints each method's time and how many of its maps are constant (carry no evidence). Runs on
the CPU in well under a minute; writes compare_methods.png into the current folder.

    python examples/compare_methods.py
"""

import time

import matplotlib

matplotlib.use("Agg")  # no window: the figure is saved to a file

import torch

import vitlens
from vitlens.data import open_dataset

model = vitlens.load_model("vitlens:fashion-vit-pm")
data = open_dataset("fashion-canvas:test:n=4")
images = torch.stack([data[i]["image"] for i in range(len(data))])  # [4, 3, 64, 64] in [0, 1]
labels = [data[i]["label"] for i in range(len(data))]

# Each method with a few of its options (`vitlens methods` lists them all). The target is each image's
# true class here; target=None would explain the predicted class instead.
methods = {
    "pm": {},  # one forward pass: the probability that each patch shows the class
    "gae": {},  # attention × its gradient, rolled out
    "rollout": {"start_layer": 0},  # class-agnostic
    "gradcam": {"layer": -1},
    "ig": {"steps": 8, "baseline": "black"},  # signed: drawn with a diverging colour map
    "occlusion": {"window": 2, "fill": "mean"},  # black-box
}

explanations = {}
for name, options in methods.items():
    start = time.perf_counter()
    e = vitlens.explain(model, images, method=name, target=labels, **options)
    seconds = time.perf_counter() - start
    explanations[name] = e
    print(f"{name:10s} {seconds:6.2f} s  scale={e.scale:11s}  constant maps: {int(e.degenerate.sum())} of {len(e)}")

fig, axes = vitlens.show(images, explanations)
fig.savefig("compare_methods.png", dpi=80)
print("wrote compare_methods.png")
