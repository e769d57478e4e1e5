"""Where a method's time goes on a GPU: the host's launch time against the device's, and the kernels.

For the forward pass and each method, under bf16 autocast: the median wall time of a call without and
with a final synchronisation (when the two are equal the host, not the GPU, sets the pace, or the call
waits for the device inside), then PyTorch's profiler table of three calls (sorted by GPU time), and with
``--traces DIR`` one call's Chrome trace per method (``DIR/trace-METHOD.json.gz``).

    python benchmarks/where_time_goes.py > benchmarks/bench_vit_base_h200/where_time_goes.txt

Needs a CUDA device (the CPU runs it too, with CPU tables).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from vitlens import load_model
from vitlens.bench import make_explainer

METHODS = "forward,pm,attention,rollout,gae,diffmask,chefer,attnlrp"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:vit_base_patch16_224?pretrained=0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--methods", default=METHODS, help="comma-separated; 'forward' is the plain forward pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--traces", type=Path, help="write one call's Chrome trace per method here")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    backbone = load_model(a.model).to(a.device).eval()
    images = torch.rand(a.batch_size, 3, *backbone.preprocessing.input_size, device=a.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for method in a.methods.split(","):
        explainer = None if method == "forward" else make_explainer(method, backbone)

        def call(explainer=explainer) -> None:
            with torch.autocast(a.device, dtype=torch.bfloat16):
                if explainer is None:
                    with torch.no_grad():
                        backbone(images)
                else:
                    explainer(images)

        for _ in range(3):
            call()
        sync()
        launch, total = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            sync()
            launch.append(t1 - t0)
            total.append(time.perf_counter() - t0)
        print(
            f"== {method}: median host (launch) {statistics.median(launch) * 1e3:.2f} ms, "
            f"with sync {statistics.median(total) * 1e3:.2f} ms",
            flush=True,
        )
        with profile(activities=activities) as prof:
            for _ in range(3):
                call()
                sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)
        if a.traces:
            a.traces.mkdir(parents=True, exist_ok=True)
            with profile(activities=activities) as prof:
                call()
                sync()
            trace = a.traces / f"trace-{method}.json"
            prof.export_chrome_trace(str(trace))
            with trace.open("rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
                shutil.copyfileobj(f, g)
            trace.unlink()


if __name__ == "__main__":
    main()
