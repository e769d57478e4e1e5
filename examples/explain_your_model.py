"""Explain your own model: a timm ViT built here, then a named vitlens model.

Shows class names, several classes per image (TopK), a score function as the target and the picture
helper. Runs offline on the CPU in a few seconds; writes explain_your_model.png into the current folder.

    python examples/explain_your_model.py
"""

import matplotlib

matplotlib.use("Agg")  # no window: the figure is saved to a file

import timm
import torch

import vitlens
from vitlens.data import open_dataset

torch.manual_seed(0)

# --- 1. Your own timm ViT ------------------------------------------------------------------------
# Random weights keep the example offline; use pretrained=True (or your fine-tuned module) in practice.
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=112).eval()

# vitlens reads the model through a Backbone view (same module, same weights). timm modules carry no
# class names, so give yours: targets can then be names.
backbone = vitlens.load_model(model)
backbone.classes = ["cat", "dog", "bird"]

images = torch.rand(2, 3, 112, 112)  # [B, 3, H, W] in [0, 1]; the model's mean/std is applied inside
e = vitlens.explain(backbone, images, method="gae", target="dog")
print("timm ViT, gae for 'dog':", e)  # maps [2, 7, 7]: one 16-px patch per cell
print("  predicted:", e.predicted_names, " explained:", e.class_names)


# A score function: any differentiable function of the model's output [B, C] giving one score per image,
# here "cat or dog" for a multi-label reading of the logits.
def cat_or_dog(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, [0, 1]].sum(1)


e = vitlens.explain(backbone, images, method="inputxgrad", target=cat_or_dog)
print("timm ViT, Input×Gradient for a score function:", tuple(e.maps.shape), e.class_names)

# --- 2. A named vitlens model -------------------------------------------------------------------------
# Shipped inside the package and loaded offline by name (`vitlens models` lists them). fashion-vit-pm
# was fine-tuned for PM, so its maps are probabilities that a patch shows the class.
model = vitlens.load_model("vitlens:fashion-vit-pm")
data = open_dataset("fashion-canvas:test:n=4")  # 64×64 canvases with one Fashion-MNIST item each
images = torch.stack([data[i]["image"] for i in range(4)])

top3 = vitlens.explain(model, images, method="pm", target=vitlens.TopK(3))  # all three from one pass
print("fashion-vit-pm, pm top-3:", tuple(top3.maps.shape))
for names, probs in zip(top3.class_names, top3.probabilities.topk(3).values.tolist(), strict=True):
    print("  ", ", ".join(f"{n} {p:.2f}" for n, p in zip(names, probs, strict=True)))

sneaker = vitlens.explain(model, images, method="gae", target="Sneaker")  # the same class for every image

# --- 3. Pictures ----------------------------------------------------------------------------------
# One row per image; the first column the image, then one column per target of the top-3 explanation
# and one for the GAE map of "Sneaker". Needs matplotlib (pip install 'vitlens[viz]').
fig, axes = vitlens.show(images, {"pm": top3, "gae: Sneaker": sneaker})
fig.savefig("explain_your_model.png", dpi=80)
print("wrote explain_your_model.png")
