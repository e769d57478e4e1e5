"""PM: probabilities from the model's own head in one pass, its BCE targets, and that fine-tuning works."""

from __future__ import annotations

import pytest
import torch

from conftest import TIMM_VARIANTS, committed, make_timm, tiny_timm
from vitlens import explain, load_model
from vitlens.backbones import adapt
from vitlens.data import collate, open_dataset
from vitlens.data.fashion import compose_grid
from vitlens.explainers import TopK, get_explainer
from vitlens.training import TrainConfig, train_pm
from vitlens.training.pm import PMTask, pm_targets, select_mask_indices


@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_pm_is_sigmoid_of_head_on_normed_patch_tokens(variant, images):
    bb = adapt(make_timm(variant))
    m = bb.model
    with torch.no_grad():  # independent computation through timm's own forward_features
        feats = m.forward_features(bb.normalize(images))[:, bb.num_prefix_tokens :]
        z = m.fc_norm(feats)
        logits = (m.head(z) + m.head_dist(z)) / 2 if hasattr(m, "head_dist") else m.head(z)
        target = m(bb.normalize(images)).argmax(1)
    expected = logits.sigmoid()[torch.arange(3), :, target].reshape(3, 4, 4)
    maps = explain(bb, images, "pm").maps
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    assert maps.min() >= 0 and maps.max() <= 1
    volume = get_explainer("pm", bb).volume(images)
    assert volume.shape == (3, 5, 4, 4)
    torch.testing.assert_close(volume[torch.arange(3), target], maps)


def test_pm_costs_one_forward_pass_for_any_number_of_targets(images):
    bb = adapt(make_timm("vit"))
    calls = []
    handle = bb.model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        e = get_explainer("pm", bb)(images)
        top = get_explainer("pm", bb)(images, TopK(3))
    finally:
        handle.remove()
    assert len(calls) == 2  # one pass each: the top classes come from the same pass
    torch.testing.assert_close(e.logits, bb(images))
    assert e.maps.shape == (3, 4, 4) and top.maps.shape == (3, 3, 4, 4)
    volume = get_explainer("pm", bb).volume(images)
    ranked = bb(images).topk(3, dim=1).indices
    torch.testing.assert_close(top.maps, volume[torch.arange(3)[:, None], ranked])
    torch.testing.assert_close(top.maps[:, 0], e.maps)


def test_pm_targets_on_a_hand_made_mask():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 0:8, 0:8] = True  # patch (0, 0) fully covered
    mask[0, 0:8, 8:12] = True  # patch (0, 1) half covered
    mask[0, 10:12, 20:22] = True  # patch (1, 2): 4 of 64 pixels
    t = pm_targets(mask, torch.tensor([3]), num_classes=5, grid=(4, 4))  # 32 px, 8 px patches
    assert t.shape == (1, 5, 4, 4)
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[0, 1], expected[1, 2] = 1.0, 0.5, 4 / 64
    torch.testing.assert_close(t[0, 3], expected)
    assert t[0, [0, 1, 2, 4]].abs().sum() == 0  # every other class: 0


def test_pm_targets_with_several_objects_give_each_class_its_own_patches():
    masks = torch.zeros(1, 3, 32, 32, dtype=torch.bool)
    masks[0, 0, 0:8, 0:8] = True  # class 2 at patch (0, 0)
    masks[0, 1, 24:32, 24:28] = True  # class 4 at patch (3, 3), half
    masks[0, 2, 0:4, 0:8] = True  # a second, smaller class-2 object on the same patch: the larger coverage wins
    t = pm_targets(masks, torch.tensor([[2, 4, 2]]), num_classes=5, grid=(4, 4))
    expected = torch.zeros(5, 4, 4)
    expected[2, 0, 0], expected[4, 3, 3] = 1.0, 0.5
    torch.testing.assert_close(t[0], expected)
    single = pm_targets(masks[:, 1], torch.tensor([4]), num_classes=5, grid=(4, 4))
    torch.testing.assert_close(single[0], (expected * (torch.arange(5) == 4)[:, None, None]))


def test_compose_grid_tiles_images_and_places_each_mask_in_its_cell():
    images = torch.rand(8, 3, 16, 16)
    masks = torch.zeros(8, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    tiles, object_masks = compose_grid(images, masks, grid=2)
    assert tiles.shape == (2, 3, 16, 16) and object_masks.shape == (2, 4, 16, 16)
    for j in range(4):
        r, c = divmod(j, 2)
        cell = (slice(None), slice(r * 8, r * 8 + 8), slice(c * 8, c * 8 + 8))
        torch.testing.assert_close(tiles[1][cell], torch.nn.functional.avg_pool2d(images[4 + j], 2))
        expected = torch.zeros(16, 16, dtype=torch.bool)
        expected[r * 8 + 2 : r * 8 + 6, c * 8 + 2 : c * 8 + 6] = True
        assert torch.equal(object_masks[1, j], expected)


def test_composites_target_each_objects_class_in_its_own_cell_and_keep_the_batch_size():
    dataset = open_dataset("fashion-canvas:train:n=200")
    bb = adapt(tiny_timm(img_size=64, num_classes=10))
    torch.manual_seed(0)
    task = PMTask(bb, dataset, mask_fraction=0.1, mask_batch=2, composites=3)
    tiles, targets = task._composite_batch("cpu")
    assert tiles.shape == (3, 3, 64, 64) and targets.shape == (3, 10, *task.grid)
    half = task.grid[0] // 2
    for t in targets:  # each class lights up only in the cells of its objects
        present = (t.flatten(1).amax(1) > 0).nonzero().flatten()
        assert 1 <= len(present) <= 4
        cells = [{(int(r) // half, int(c) // half) for r, c in t[k].nonzero()} for k in present]
        assert sum(map(len, cells)) <= 4 and all(a.isdisjoint(b) for i, a in enumerate(cells) for b in cells[i + 1 :])
    sizes = []
    forward = task.net.forward
    task.net.forward = lambda x, n: sizes.append((len(x), n)) or forward(x, n)
    loss, logs = task.loss(task.net, collate([dataset[i] for i in range(16)]), 0)
    assert sizes == [(16, 5)]  # 11 ordinary + 2 masked + 3 composites: same batch size as a classifier step
    assert torch.isfinite(loss) and logs["pm_bce"] > 0


def test_mask_indices_are_a_fixed_seeded_fraction():
    a = select_mask_indices(60000, 0.01, seed=0)
    assert len(a) == 600 and a == select_mask_indices(60000, 0.01, seed=0) and len(set(a)) == 600
    assert a != select_mask_indices(60000, 0.01, seed=1)
    assert len(select_mask_indices(50, 0.001, seed=0)) == 1


def _energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> float:
    cover = torch.nn.functional.adaptive_avg_pool2d(masks[:, None].float(), maps.shape[-2:])[:, 0]
    return ((maps * cover).sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-9)).mean().item()


def test_short_pm_finetuning_moves_the_map_onto_the_object(tmp_path):
    base_dir = committed("fashion-vit")
    base = load_model(base_dir)
    held_out = collate([open_dataset("fashion-canvas:test:n=100,seed=5")[i] for i in range(100)])
    images, labels, masks = held_out["image"], held_out["label"], held_out["mask"]
    before = _energy_in_mask(explain(base, images, "pm", labels).maps, masks)
    out = tmp_path / "pm"
    cfg = TrainConfig(max_steps=60, batch_size=32, lr=1e-3, warmup_steps=5, log_every=20)
    data, test = "fashion-canvas:train:n=3000", "fashion-canvas:test:n=200"
    summary = train_pm(base_dir, data, out, cfg, mask_fraction=0.01, lam=10.0, composites=0, pseudo_rounds=0,
                       eval_data=test)  # fmt: skip
    tuned = load_model(out)
    after = _energy_in_mask(explain(tuned, images, "pm", labels).maps, masks)
    assert after > 1.5 * before  # the untuned read-out is near chance; 30 masks and 60 steps move it
    # no parameters added: same names and shapes
    shapes = {k: v.shape for k, v in tuned.model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in base.model.state_dict().items()}
    pm = tuned.config["pm"]
    assert pm["masks_used"] == 30 and pm["mask_indices"] == select_mask_indices(3000, 0.01, 0)
    assert tuned.config["kind"] == "pm" and "accuracy_before" in tuned.config["training"]
    assert summary["test_n"] == 200
