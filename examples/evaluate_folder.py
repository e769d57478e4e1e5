"""Evaluate explanation methods on your own folder data set, from Python and from the command line.

A folder data set is ROOT/SPLIT/<class>/<image> with an optional ROOT/SPLIT/localization.txt
(``relative/path.png,x0,y0,x1,y1`` per box, wsolevaluation's format) and ROOT/SPLIT/masks/<relative
path>. To stay offline this example builds one in a temporary folder from fashion-canvas test images
(with their boxes), then scores two methods on the named model vitlens:fashion-vit-pm. Runs on the CPU in
well under a minute; writes evaluate_folder.json (the CLI's results file) into the current folder.

    python examples/evaluate_folder.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torchvision.utils

import vitlens
import vitlens.metrics
from vitlens.data import open_dataset

MODEL = "vitlens:fashion-vit-pm"
PER_CLASS = 2


def export_folder(root: Path) -> None:
    """Write PER_CLASS fashion-canvas test images of every class to ROOT/test/<class>/, with their boxes."""
    classes = vitlens.load_model(MODEL).classes
    data = open_dataset("fashion-canvas:test:n=100")
    counts = [0] * len(classes)
    lines = []
    for i in range(len(data)):
        sample = data[i]
        label = sample["label"]
        if counts[label] == PER_CLASS:
            continue
        counts[label] += 1
        # Labels of a folder data set are the class folders in sorted order, so the folder names start
        # with the model's class index to keep the model's order ("T-shirt/top" also needs its "/" gone).
        folder = f"{label}-{classes[label].replace('/', '-')}"
        relative = f"{folder}/{counts[label]:03d}.png"
        (root / "test" / folder).mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(sample["image"], root / "test" / relative)
        for x0, y0, x1, y1 in sample["boxes"].int().tolist():  # inclusive pixel corners
            lines.append(f"{relative},{x0},{y0},{x1},{y1}")
    assert min(counts) == PER_CLASS, "fewer test images than expected for some class"
    (root / "test" / "localization.txt").write_text("\n".join(lines) + "\n")


with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp) / "my-data"
    export_folder(root)
    data = f"folder:{root}:test"

    # --- Python: vitlens.metrics.evaluate returns the summary --------------------------------------
    summary = vitlens.metrics.evaluate(
        MODEL,
        methods=["pm", "gae"],
        metrics=["pointing-game", "energy-pointing-game", "maxboxacc-v2"],
        data=data,
        progress=False,
    )
    print(vitlens.metrics.format_table(summary))

    # --- The command line: the same evaluation, written to a results file for `vitlens report` -------
    command = [sys.executable, "-m", "vitlens", "evaluate", "--model", MODEL, "--methods", "pm,rollout",
               "--metrics", "pointing-game,maxboxacc-v2", "--data", data, "--out", "evaluate_folder.json"]  # fmt: skip
    subprocess.run(command, check=True)
    print("wrote evaluate_folder.json (render it with: vitlens report evaluate_folder.json --out report.html)")
