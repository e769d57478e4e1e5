"""Vision DiffMask: gate statistics, the Lagrangian's ascent, frozen classifier, faithful maps."""

from __future__ import annotations

import pytest
import torch

from conftest import committed, make_timm
from vitlens import VitlensError, explain, load_model
from vitlens.backbones import adapt
from vitlens.data import collate, open_dataset
from vitlens.explainers.diffmask import DiffMaskGates, HardConcrete
from vitlens.metrics import evaluate
from vitlens.training import TrainConfig, train_classifier, train_diffmask
from vitlens.training.diffmask import DiffMaskTask


@pytest.mark.parametrize("r", [1.0, 1.1])
def test_hard_concrete_matches_closed_form(r):
    torch.manual_seed(0)
    gate = HardConcrete(beta=0.2, l=-0.2, r=r)
    log_alpha = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0])[:, None].expand(5, 200_000)
    z = gate.sample(log_alpha)
    assert z.min() >= 0 and z.max() <= 1
    torch.testing.assert_close((z > 0).float().mean(1), gate.log_p_open(log_alpha[:, 0]).exp(), atol=4e-3, rtol=0)
    if r > 1:  # with r = 1 the stretched gate reaches 1 only through float saturation of the sigmoid
        torch.testing.assert_close((z == 1).float().mean(1), gate.p_one(log_alpha[:, 0]), atol=4e-3, rtol=0)


def test_gate_logits_of_all_probes_at_once_equal_each_probe_on_its_concatenated_state():
    """log_alpha computes every probe in one pass; Vision DiffMask's probe k reads [h_0 ; h_k] per token."""
    torch.manual_seed(0)
    bb = adapt(make_timm("vit")).eval()
    gates = DiffMaskGates.for_backbone(bb)
    with torch.no_grad():
        for p in gates.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the initial values, which share structure
    trace = bb.run(torch.rand(3, 3, *bb.preprocessing.input_size))
    states, p = gates.states(trace), trace.num_prefix_tokens
    each = [probe(states[0], s)[:, p:] for probe, s in zip(gates.probes, states, strict=True)]
    torch.testing.assert_close(gates.log_alpha(trace), torch.stack(each, 1), rtol=1e-5, atol=1e-5)
    gates.log_alpha(trace).sum().backward()
    assert all(q.grad.abs().sum() > 0 for n, q in gates.named_parameters() if n != "placeholder")


def _constraint_step(task: DiffMaskTask, kl: float) -> torch.Tensor:
    layer = torch.arange(len(task.multipliers))
    loss = (task.multipliers[layer] * (torch.full((len(layer),), kl) - task.kl_margin)).mean()
    loss.backward()
    task.after_step(0)
    return task.multipliers.detach().clone()


def test_multipliers_rise_when_violated_and_fall_to_the_floor_when_satisfied():
    task = DiffMaskTask(adapt(make_timm("vit")), kl_margin=0.1, multiplier_lr=0.5)
    start = task.multipliers.detach().clone()
    violated = _constraint_step(task, kl=1.0)
    assert (violated > start).all()  # gradient ascent: a violated constraint raises its multiplier
    for _ in range(300):
        satisfied = _constraint_step(task, kl=0.0)
    assert torch.equal(satisfied, torch.zeros_like(satisfied))  # clipped at the floor, never negative
    for _ in range(400):
        top = _constraint_step(task, kl=5.0)
    assert torch.equal(top, torch.full_like(top, 200.0))  # and at the ceiling


def test_training_keeps_the_classifier_frozen_and_the_prediction_within_the_margin(tmp_path):
    base = committed("counting-vit")
    out = tmp_path / "dm"
    cfg = TrainConfig(max_steps=150, batch_size=32, lr=1e-3, warmup_steps=10, log_every=50)
    summary = train_diffmask(base, "counting:train:n=4000", out, cfg, kl_margin=0.1)
    assert summary["held_out_within_margin"] >= 0.9 and summary["held_out_kl"] <= 0.1
    classifier, gated = load_model(base), load_model(out)
    for k, v in classifier.model.state_dict().items():
        assert torch.equal(v, gated.model.state_dict()[k])  # the checkpoint's classifier is the frozen one
    train_images = collate([open_dataset("counting:train:n=4000")[i] for i in range(64)])["image"]
    task = DiffMaskTask(gated, kl_margin=0.1, gates=DiffMaskGates.from_checkpoint(gated))
    assert task.masked_kl(train_images).mean() <= 0.1
    images = train_images[:4]
    maps = explain(gated, images, "diffmask").maps
    assert maps.shape == (4, 3, 3) and maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(explain(gated, images, "diffmask", target=0).maps, maps)  # explains the distribution


def test_diffmask_needs_a_diffmask_checkpoint(images):
    with pytest.raises(VitlensError, match="DiffMask checkpoint"):
        explain(adapt(make_timm("vit")), images, "diffmask")
    with pytest.raises(VitlensError, match="DiffMask checkpoint"):
        explain(load_model(committed("counting-vit")), torch.rand(1, 3, 48, 48), "diffmask")


def test_no_gradient_reaches_the_classifier_parameters():
    bb = adapt(make_timm("vit"))
    task = DiffMaskTask(bb)
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.zeros(4, dtype=torch.long)}
    loss, _ = task.loss(task.modules(), batch, 0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())
    assert all(p.grad is not None for p in task.gates.probes.parameters())
    assert task.gates.placeholder.grad is not None and task.multipliers.grad is not None


def _mass_on_target_cells(model, spec: str, methods) -> dict[str, float]:
    ds = open_dataset(spec)
    batch = collate([ds[i] for i in range(len(ds))])
    keep = (batch["label"] > 0) & (batch["label"] < len(ds.classes) - 1)
    images, masks = batch["image"][keep], batch["mask"][keep]
    grid = (ds.grid, ds.grid)
    cover = torch.nn.functional.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]
    result = {}
    for m in methods:
        maps = explain(model, images, m).maps.clamp_min(0)
        result[m] = ((maps * cover).sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-12)).mean().item()
    return result


def test_faithfulness_on_the_committed_counting_checkpoint():
    model = load_model(committed("counting-vit-diffmask"))
    shares = _mass_on_target_cells(model, "counting:test:n=300,seed=9", ["diffmask", "rollout", "gradcam"])
    assert shares["diffmask"] > 0.5
    assert shares["diffmask"] > shares["rollout"] and shares["diffmask"] > shares["gradcam"]


@pytest.mark.slow
@pytest.mark.parametrize("colour, grid", [("blue", 3), ("green", 4)])
def test_faithfulness_for_other_colours_and_grid_sizes(tmp_path, colour, grid):
    data = f"counting:train:colour={colour},grid={grid},n=6000"
    cfg = TrainConfig(max_steps=500, batch_size=64, lr=2e-3, warmup_steps=50, log_every=100)
    clf = train_classifier(data, tmp_path / "clf", cfg, eval_data=f"counting:test:colour={colour},grid={grid},n=500")
    assert clf["test_accuracy"] > 0.8
    # 600 steps: at 300 the 4×4 grid's gates had not converged (0.496 of the mass on the cells, rollout 0.490)
    dm_cfg = TrainConfig(max_steps=600, batch_size=32, lr=3e-4, warmup_steps=20, log_every=100)
    train_diffmask(tmp_path / "clf", data, tmp_path / "dm", dm_cfg)
    shares = _mass_on_target_cells(
        load_model(tmp_path / "dm"),
        f"counting:test:colour={colour},grid={grid},n=300,seed=9",
        ["diffmask", "rollout", "gradcam"],
    )
    assert shares["diffmask"] > 0.5
    assert shares["diffmask"] > shares["rollout"] and shares["diffmask"] > shares["gradcam"]


def test_negative_perturbation_on_fashion_keeps_the_prediction_longer_than_rollout_and_gradcam():
    summary = evaluate(
        committed("fashion-vit-diffmask"), "diffmask,rollout,gradcam", "negative-perturbation",
        "fashion-canvas:test:seed=3", limit=96, batch_size=48, target="predicted", progress=False,
    )  # fmt: skip
    auc = {m: r["negative-perturbation"] for m, r in summary["results"].items()}
    assert auc["diffmask"] > auc["rollout"] and auc["diffmask"] > auc["gradcam"], auc
