"""The same code on a CUDA device: maps equal the CPU's, bf16 autocast runs, training learns on the GPU.

Skipped where no GPU is present (CI); run on a GPU machine with ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import committed, tiny_timm
from vitlens import load_model
from vitlens.backbones import adapt
from vitlens.bench import bench, format_bench, with_untrained_gates
from vitlens.cli import main
from vitlens.data import open_dataset
from vitlens.explainers import EXPLAINERS, get_explainer
from vitlens.training import TrainConfig, accuracy, train_classifier, train_pm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CLASSIFIER_METHODS = sorted(set(EXPLAINERS) - {"bcos"})


def _pair(method: str):
    """The same tiny ViT (with seeded gates for DiffMask) on the CPU and on the GPU, and a batch of images."""

    def model():
        bb = adapt(tiny_timm())
        return with_untrained_gates(bb) if method == "diffmask" else bb

    cpu, gpu = model(), model().to(CUDA)
    torch.manual_seed(1)
    return cpu, gpu, torch.rand(4, 3, 32, 32)


@pytest.fixture
def no_tf32():
    """Full fp32 matrix products on the GPU for the comparisons with the CPU (TF32 keeps 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_maps_on_gpu_equal_the_cpu_maps(method, no_tf32):
    cpu, gpu, images = _pair(method)
    target = torch.tensor([0, 1, 2, 3])
    on_cpu = get_explainer(method, cpu)(images, target).maps
    on_gpu = get_explainer(method, gpu)(images.to(CUDA), target.to(CUDA)).maps
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    scale = on_cpu.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close((on_gpu.cpu() / scale), on_cpu / scale, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_maps_under_bf16_autocast_follow_fp32(method):
    """On the committed fashion models (random tiny ViTs have nearly flat maps that rounding dominates)."""
    bb = load_model(committed({"pm": "fashion-vit-pm", "diffmask": "fashion-vit-diffmask"}.get(method, "fashion-vit")))
    bb = bb.to(CUDA)
    ds = open_dataset("fashion-canvas:test:n=8")
    images = torch.stack([ds[i]["image"] for i in range(8)]).to(CUDA)
    target = torch.tensor([ds[i]["label"] for i in range(8)], device=CUDA)
    fp32 = get_explainer(method, bb)(images, target).maps
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = get_explainer(method, bb)(images, target).maps
    assert bf16.shape == fp32.shape and torch.isfinite(bf16).all()
    a, b = fp32.flatten(1).float(), bf16.flatten(1).float()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    shaped = a.norm(dim=1) > 1e-6  # a flat map (e.g. Grad-CAM after its ReLU) has no correlation to compare
    corr = (a * b).sum(1)[shaped] / (a.norm(dim=1) * b.norm(dim=1))[shaped].clamp_min(1e-12)
    assert corr.median() > 0.9, corr  # bf16 keeps 8 bits of mantissa: single images may drift, not the batch


def test_bcos_contributions_on_gpu_equal_the_cpu_ones(no_tf32):
    cpu = load_model("bcos:bcos_vit_fashion?pretrained=0").eval()
    gpu = load_model("bcos:bcos_vit_fashion?pretrained=0").to(CUDA).eval()
    gpu.load_state_dict(cpu.state_dict())
    torch.manual_seed(0)
    images = torch.rand(2, 3, *cpu.preprocessing.input_size)
    on_cpu = get_explainer("bcos", cpu)(images)
    on_gpu = get_explainer("bcos", gpu)(images.to(CUDA))
    ours, theirs = on_cpu.extras["contributions"], on_gpu.extras["contributions"]
    assert theirs.device.type == "cuda"
    torch.testing.assert_close(on_gpu.logits.cpu(), on_cpu.logits, rtol=1e-4, atol=1e-4)
    scale = ours.abs().amax()
    torch.testing.assert_close(theirs.cpu() / scale, ours / scale, rtol=1e-3, atol=1e-4)


def test_bench_on_gpu_reports_allocator_peaks():
    record = bench(adapt(tiny_timm()), ["pm", "rollout", "gradcam"], batch_size=4, device="cuda", repeat=2)
    assert record["device"] == torch.cuda.get_device_name(CUDA)
    for r in record["results"].values():
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] > 0 and r["ratio_to_forward"] > 0


@pytest.mark.parametrize("method", ["attention", "rollout", "gae"])
def test_attention_methods_keep_the_fused_kernel_under_bf16(method, monkeypatch):
    """The forward pass runs F.scaled_dot_product_attention once per block; the maps follow the explicit path."""
    from test_attention_probe import backbone, explicit

    bb = backbone("timm-vit").to(CUDA)
    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 32, device=CUDA)
    calls, original = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = get_explainer(method, bb)(images).maps
        assert len(calls) == len(bb.blocks)
        with explicit(bb):
            reference = get_explainer(method, bb)(images).maps
    top = reference.abs().amax((1, 2), keepdim=True)
    torch.testing.assert_close(fused / top, reference / top, atol=0.05, rtol=0)


@pytest.mark.parametrize("method", ["pm", "attention", "rollout", "gae", "diffmask"])
def test_methods_queue_their_work_without_waiting_for_the_device(method):
    """Between the input check and the result no host–device synchronisation: the host's Python runs ahead
    of the GPU (after a sync the GPU idles while the host catches up, which a fast bf16 forward pass shows)."""
    from vitlens.explainers.base import frozen_eval
    from vitlens.explainers.targets import Target

    bb = adapt(tiny_timm()).to(CUDA)
    explainer = get_explainer(method, with_untrained_gates(bb) if method == "diffmask" else bb)
    images = torch.rand(4, 3, 32, 32, device=CUDA)
    with frozen_eval(bb, float32=True), torch.enable_grad():
        explainer.explain_targets(images, [Target()])  # lazy CUDA set-up may synchronise once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            maps, *_ = explainer.explain_targets(images, [Target()])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert maps.shape == (4, 4, 4) and torch.isfinite(maps).all()


def test_bench_bf16_on_gpu(capsys):
    """``vitlens bench --autocast bf16`` at ViT-B/16, batch 64: every ratio against the fused bf16 forward
    (targets on a GPU: pm ≤ 1.05×, attention ≤ 1.15×, rollout ≤ 1.6×, gae ≤ 2.6×, diffmask ≤ 1.2×; printed,
    not asserted: timings are not a test)."""
    model = "timm:vit_base_patch16_224?pretrained=0"
    methods = "pm,attention,rollout,gae,diffmask"
    args = ["bench", "--model", model, "--device", "cuda", "--autocast", "bf16", "--methods", methods,
            "--batch-size", "64", "--repeat", "5", "--json"]  # fmt: skip
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["autocast"] == "bfloat16" and record["device"] == torch.cuda.get_device_name(CUDA)
    assert all(r["ratio_to_forward"] > 0 for r in record["results"].values())
    with capsys.disabled():
        print("\n" + format_bench(record))


def test_training_on_gpu_learns_and_loads_on_cpu(tmp_path):
    cfg = TrainConfig(max_steps=120, batch_size=32, lr=2e-3, warmup_steps=20, log_every=20, device="cuda")
    summary = train_classifier("counting:train:grid=2,n=2000", tmp_path / "run", cfg,
                               eval_data="counting:test:grid=2,n=400")  # fmt: skip
    assert summary["test_accuracy"] > 0.6  # chance is 1/5
    on_cpu = load_model(tmp_path / "run")  # saved from the GPU, read back on the CPU
    assert accuracy(on_cpu, open_dataset("counting:test:grid=2,n=400")) == pytest.approx(
        summary["test_accuracy"], abs=0.01
    )
    pm_cfg = TrainConfig(max_steps=20, batch_size=16, lr=2e-4, warmup_steps=5, log_every=10, device="cuda")
    train_pm(tmp_path / "run", "counting:train:grid=2,n=400", tmp_path / "pm", pm_cfg, mask_fraction=0.1)
    pm = load_model(tmp_path / "pm")
    maps = get_explainer("pm", pm)(torch.rand(2, 3, *pm.preprocessing.input_size), torch.tensor([0, 1])).maps
    assert torch.isfinite(maps).all() and ((maps >= 0) & (maps <= 1)).all()
