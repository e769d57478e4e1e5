"""The training loop: it learns, checkpoints round-trip, resume follows the uninterrupted path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from vitlens import VitlensError, load_model
from vitlens.data import open_dataset, parse_data_spec
from vitlens.models.checkpoint import load_checkpoint, read_config, save_checkpoint
from vitlens.training import ClassifierTask, TrainConfig, accuracy, build_classifier, train, train_classifier

COUNTING = "counting:train:grid=2,n=2000"


def test_short_training_run_learns(tmp_path):
    cfg = TrainConfig(max_steps=120, batch_size=32, lr=2e-3, warmup_steps=20, log_every=20)
    summary = train_classifier(COUNTING, tmp_path / "run", cfg, eval_data="counting:test:grid=2,n=400")
    assert summary["test_n"] == 400
    assert summary["test_accuracy"] > 0.6  # chance is 1/5
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [20, 40, 60, 80, 100, 120]
    assert log[0]["loss"] > log[-2]["loss"]
    config = read_config(tmp_path / "run")
    assert config["kind"] == "classifier" and config["training"]["step"] == 120
    assert config["training"]["test_accuracy"] == summary["test_accuracy"]
    reloaded = load_model(tmp_path / "run")
    assert accuracy(reloaded, open_dataset("counting:test:grid=2,n=400")) == summary["test_accuracy"]


def test_bf16_autocast_learns_with_float32_weights(tmp_path):
    spec = parse_data_spec(COUNTING)
    data = open_dataset(spec)
    seen = []

    class Watched(ClassifierTask):
        def loss(self, module, batch, step):
            out = []
            hook = self.backbone.blocks[-1].register_forward_hook(lambda m, i, o: out.append(o.dtype))
            logits = module(batch["image"][:1])
            hook.remove()
            seen.append((logits.dtype, out[0], [blk.attn.fused_attn for blk in self.backbone.blocks]))
            return super().loss(module, batch, step)

    torch.manual_seed(0)
    task = Watched(build_classifier(None, spec, data))
    cfg = TrainConfig(max_steps=120, batch_size=32, lr=2e-3, warmup_steps=20, log_every=20, autocast="bf16")
    test = open_dataset("counting:test:grid=2,n=400")
    train(task, data, tmp_path / "run", cfg, evaluate=lambda bb, d: {"test_accuracy": accuracy(bb, test)})
    # bf16 matrix products, explicit attention, and a float32 residual stream (the position embedding's
    # float32 addition promotes it, and each block adds its bf16 branches to it, as under CUDA autocast)
    assert seen[0] == (torch.bfloat16, torch.float32, [False] * len(task.backbone.blocks))
    assert all(blk.attn.fused_attn for blk in task.backbone.blocks)  # restored after the step
    assert all(p.dtype == torch.float32 for p in task.backbone.parameters())
    config = read_config(tmp_path / "run")["training"]
    assert config["config"]["autocast"] == "bf16"
    assert config["test_accuracy"] > 0.6  # chance is 1/5; the float32 run above learns the same task


def test_checkpoint_round_trip(tiny_checkpoint, images):
    bb = load_checkpoint(tiny_checkpoint)
    assert bb.classes == list("abcde") and bb.preprocessing.input_size == (32, 32)
    again_dir = tiny_checkpoint.parent / "again"
    save_checkpoint(again_dir, bb, extra_tensors={"probe.w": torch.arange(3.0)}, extra_config={"note": 1})
    again = load_checkpoint(again_dir)
    with torch.no_grad():
        torch.testing.assert_close(again(images), bb(images), rtol=0, atol=0)
    assert torch.equal(again.checkpoint.tensors["probe.w"], torch.arange(3.0)) and again.config["note"] == 1
    assert not list(again_dir.parent.glob(".again*"))  # no temporary left behind


def test_checkpoint_swap_interrupted_is_recovered(tiny_checkpoint, tmp_path):
    bb = load_checkpoint(tiny_checkpoint)
    path = tmp_path / "ck"
    save_checkpoint(path, bb)
    os.replace(path, tmp_path / ".ck.old")  # a kill between the two renames of the swap
    assert load_checkpoint(path).classes == bb.classes


def _weights(path):
    return {k: v.clone() for k, v in load_checkpoint(path).model.state_dict().items()}


class _Interrupt(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(tmp_path):
    spec = parse_data_spec(COUNTING)
    data = open_dataset(spec)
    cfg = TrainConfig(max_steps=12, batch_size=16, warmup_steps=4, checkpoint_every_s=0.0, log_every=1)

    torch.manual_seed(0)
    train(ClassifierTask(build_classifier(None, spec, data)), data, tmp_path / "full", cfg)

    class Interrupted(ClassifierTask):
        def after_step(self, step):
            if step == 7:
                raise _Interrupt

    torch.manual_seed(0)
    with pytest.raises(_Interrupt):
        train(Interrupted(build_classifier(None, spec, data)), data, tmp_path / "cut", cfg)
    assert read_config(tmp_path / "cut")["training"]["step"] == 7
    train(ClassifierTask(load_checkpoint(tmp_path / "cut")), data, tmp_path / "cut", cfg, resume=True)
    assert read_config(tmp_path / "cut")["training"]["step"] == 12
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:12] == list(range(1, 13))  # no duplicated log lines after the resume


def test_resume_errors(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=8)
    with pytest.raises(VitlensError, match="no training checkpoint"):
        train_classifier(COUNTING, tmp_path / "none", cfg, resume=True)
    train_classifier(COUNTING, tmp_path / "run", cfg)
    with pytest.raises(VitlensError, match="--resume"):
        train_classifier(COUNTING, tmp_path / "run", cfg)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           "-m", "vitlens", "train", "classifier", "--data", COUNTING, "--out", str(out), "--max-steps", "40",
           "--batch-size", "16", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = read_config(out)
    assert config["training"]["world_size"] == 2 and config["training"]["step"] == 40
    assert config["training"]["test_accuracy"] > 0.4


@pytest.mark.parametrize(
    ("n", "given", "expected"),
    [(1400, {}, 2100), (3000, {}, 4600), (60000, {}, 10000), (3000, {"epochs": 2}, None), (3000, {"max_steps": 7}, 7)],
)
def test_a_classifier_from_scratch_without_a_length_trains_for_enough_steps(monkeypatch, tmp_path, capsys, n, given,
                                                                            expected):  # fmt: skip
    import vitlens.training.classifier as classifier

    seen = {}
    monkeypatch.setattr(classifier, "train", lambda task, dataset, out, cfg, **kw: seen.update(cfg=cfg) or {})
    train_classifier(f"counting:train:grid=2,n={n}", tmp_path / "run", TrainConfig(batch_size=64, **given))
    assert seen["cfg"].max_steps == expected
    assert seen["cfg"].total_steps(n, 1) == (expected or 2 * (n // 64))  # --epochs 2: two passes
    assert ("no --epochs or --max-steps" in capsys.readouterr().err) == (not given)
