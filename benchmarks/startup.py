"""Start-up and import times: what a user waits for before vitlens answers.

Each command runs in a fresh interpreter (``--repeat`` times, interleaved, so that a shared machine's
drifts hit all of them alike); the record keeps the median and the minimum wall time of each, and
which heavy libraries each one imported (``vitlens --help`` must import none of them).

    python benchmarks/startup.py --repeat 7 > benchmarks/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "torchvision", "timm", "transformers", "matplotlib", "numpy", "scipy")
REPORT = "import sys; print(','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)"

# name → Python code run with -c (stdout is discarded); argparse's exit is caught so the report still prints
COMMANDS = {
    "python (interpreter alone)": "pass",
    "import vitlens": "import vitlens",
    "vitlens --help": "from vitlens.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "vitlens evaluate --help": "from vitlens.cli import main\ntry:\n    main(['evaluate', '--help'])\n"
    "except SystemExit:\n    pass",
    "vitlens --version": "from vitlens.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass",
    "vitlens models": "from vitlens.cli import main\nmain(['models'])",
    "import torch": "import torch",
    "import torch, timm": "import torch, timm",
    "vitlens.load_model (first use)": "import vitlens\nvitlens.load_model",
    "vitlens.explain (first use)": "import vitlens\nvitlens.explain",
    "load_model('vitlens:fashion-vit')": "import vitlens\nvitlens.load_model('vitlens:fashion-vit')",
}


def run(code: str) -> tuple[float, list[str]]:
    """Wall seconds of a fresh interpreter running ``code``, and the heavy modules it imported."""
    full = f"{code}\n{REPORT.format(heavy=HEAVY)}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    return seconds, [m for m in proc.stderr.strip().splitlines()[-1].split(",") if m] if proc.stderr.strip() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="runs of every command (default: 7)")
    a = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    imported: dict[str, list[str]] = {}
    for code in COMMANDS.values():  # one warm-up each: the file system cache
        run(code)
    for _ in range(a.repeat):
        for name, code in COMMANDS.items():
            seconds, heavy = run(code)
            times[name].append(seconds)
            imported[name] = heavy
    import torch

    import vitlens

    record = {
        "what": "wall seconds of a fresh interpreter per command (median, min over --repeat runs)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vitlens": vitlens.__version__,
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeat": a.repeat,
        "results": {
            name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3), "imports": imported[name]}
            for name, t in times.items()
        },
    }
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
