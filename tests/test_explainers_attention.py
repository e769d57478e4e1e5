"""Raw attention and rollout against a direct transcription of Abnar & Zuidema (2020)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_timm
from vitlens import VitlensError, explain
from vitlens.backbones import adapt


def abnar_zuidema_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Eq. of the paper: Ã(l) = Â(l) Ã(l−1), Â = 0.5·W_att + 0.5·I, heads averaged; full matrices."""
    t = attentions[0].shape[-1]
    rollout = torch.eye(t).expand(attentions[0].shape[0], t, t)
    for a in attentions:
        a_hat = 0.5 * a.mean(1) + 0.5 * torch.eye(t)
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        rollout = a_hat @ rollout
    return rollout


def test_rollout_matches_paper_equations(images):
    bb = adapt(make_timm("vit"))
    maps = explain(bb, images, "rollout").maps
    with torch.no_grad():
        attentions = bb.run(images, attention=True).attentions
    expected = abnar_zuidema_rollout(attentions)[:, 0, 1:].reshape(3, 4, 4)
    torch.testing.assert_close(maps, expected)


def test_rollout_distilled_and_avg_pool_use_the_readout(images):
    bb = adapt(make_timm("deit-distilled"))
    with torch.no_grad():
        rollout = abnar_zuidema_rollout(bb.run(images, attention=True).attentions)
    expected = (0.5 * (rollout[:, 0] + rollout[:, 1]))[:, 2:].reshape(3, 4, 4)
    torch.testing.assert_close(explain(bb, images, "rollout").maps, expected)
    avg = adapt(make_timm("avg-pool-no-cls"))
    with torch.no_grad():
        rollout = abnar_zuidema_rollout(avg.run(images, attention=True).attentions)
    torch.testing.assert_close(explain(avg, images, "rollout").maps, rollout.mean(1).reshape(3, 4, 4))


def test_attention_is_last_block_class_row(images):
    bb = adapt(make_timm("registers"))
    with torch.no_grad():
        last = bb.run(images, attention=True).attentions[-1]
    torch.testing.assert_close(explain(bb, images, "attention").maps, last.mean(1)[:, 0, 5:].reshape(3, 4, 4))
    with pytest.raises(VitlensError, match="class token"):
        explain(adapt(make_timm("avg-pool-no-cls")), images, "attention")


@pytest.mark.parametrize("method", ["rollout", "attention"])
def test_contract_batch_single_and_model_unchanged(method, images):
    bb = adapt(make_timm("vit"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    bb.train()
    maps = explain(bb, images, method).maps
    assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert maps.std() > 0
    single = torch.cat([explain(bb, images[i : i + 1], method).maps for i in range(3)])
    torch.testing.assert_close(single, maps, atol=1e-6, rtol=1e-5)
    assert bb.training and all(m.training for m in bb.modules())
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    assert all(p.requires_grad for p in bb.parameters())
    assert all(not m._forward_hooks for m in bb.modules())


def test_unknown_method_and_bad_inputs(images):
    bb = adapt(make_timm("vit"))
    with pytest.raises(VitlensError, match="unknown method"):
        explain(bb, images, "nope")
    with pytest.raises(VitlensError, match="unknown option"):
        explain(bb, images, "rollout", steps=3)
    with pytest.raises(VitlensError, match="NaN"):
        explain(bb, images * float("nan"), "rollout")
    with pytest.raises(VitlensError, match=r"\[B, 3, H, W\]"):
        explain(bb, images[0, 0], "rollout")
    torch.testing.assert_close(explain(bb, images[0], "rollout").maps, explain(bb, images[:1], "rollout").maps)
