"""GAE, transformer attribution (chefer) and attention flow against independent computations.

- GAE: the equations of Chefer et al. (ICCV 2021) with full T×T matrices, on attention recomputed by hand
  from the weights (gradients by autograd on that re-implementation, not through the adapters' hooks).
- chefer: a direct, unoptimised transcription of the reference implementation's relprop rules
  (hila-chefer/Transformer-Explainability, ``modules/layers_ours.py`` and ``baselines/ViT/ViT_LRP.py``),
  one image at a time as the reference runs.
- flow: a plain Edmonds–Karp max-flow on the layered attention graph of Abnar & Zuidema (2020).
"""

from __future__ import annotations

import math
from collections import deque

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import make_timm
from test_backbones_hf_tv import make as make_hf_tv
from vitlens import VitlensError, explain
from vitlens.backbones import adapt
from vitlens.explainers.chefer import (
    _activations,
    _add_rule,
    _head_relevance,
    _lrp_block,
    _matmul_rule,
    _zplus,
)

METHODS = ["gae", "chefer", "flow"]
TIMM = ["vit", "deit-distilled", "registers", "avg-pool-no-cls"]
HF_TV = ["hf-vit", "hf-deit", "hf-deit-distilled", "torchvision"]


def sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw all weights larger than the default init, so attention and gradients are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 0:  # scalars (an image–text model's logit scale) keep their value
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # norm scales around 1, biases around 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:  # projections ~1.5/sqrt(fan-in); class/position embeddings O(1)
                p.copy_(noise * 1.5 / (p[0].numel() ** 0.5 if p.shape[0] > 1 else 1.0))
    return model.eval()


def far_from_uniform(maps: Tensor) -> bool:
    """Every map varies by more than 1% of its mean magnitude (so that a comparison can fail)."""
    flat = maps.detach().flatten(1)
    return bool((flat.std(1) > 0.01 * flat.abs().mean(1)).all())


def backbone(kind: str):
    if kind in TIMM:
        return adapt(sharpen(make_timm(kind)))
    hf_kind = {"hf-vit": "vit", "hf-deit": "deit", "hf-deit-distilled": "deit_distilled"}.get(kind, kind)
    return adapt(sharpen(make_hf_tv(hf_kind)[0]))


@pytest.fixture
def images() -> Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- GAE: the paper's equations, by hand ----------------------------------------------------------


def manual_timm_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """A timm ViT written out by hand from its weights: logits and every block's softmax(q kᵀ/√d)."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    attentions = []
    for blk in model.blocks:
        b, t, d = tokens.shape
        heads = blk.attn.num_heads
        h = F.layer_norm(tokens, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        attentions.append(a)
        tokens = tokens + ((a @ v).transpose(1, 2).reshape(b, t, d) @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        h = F.layer_norm(tokens, (d,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        hidden = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        tokens = tokens + hidden @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return model.forward_head(model.norm(tokens)), attentions


@pytest.mark.parametrize("variant", ["vit", "deit-distilled", "avg-pool-no-cls"])
def test_gae_matches_paper_equations(variant, images):
    bb = backbone(variant)
    model = bb.model
    target = torch.tensor([0, 3, 1])
    with torch.enable_grad():
        logits, attentions = manual_timm_forward(model, bb.normalize(images))
        grads = torch.autograd.grad(logits[torch.arange(3), target].sum(), attentions)
    torch.testing.assert_close(logits, bb(images), atol=1e-4, rtol=1e-4)  # the hand-written model is the model
    t = attentions[0].shape[-1]
    relevance = torch.eye(t).expand(3, t, t)
    for a, g in zip(attentions, grads, strict=True):  # rule 5: Ā = E_h[(∇A ⊙ A)⁺]; rule 6: R ← R + Ā·R
        relevance = relevance + (g * a).clamp(min=0).mean(1) @ relevance
    if variant == "vit":
        expected = relevance[:, 0, 1:]
    elif variant == "deit-distilled":
        expected = 0.5 * (relevance[:, 0, 2:] + relevance[:, 1, 2:])
    else:
        expected = relevance.mean(1)
    maps = explain(bb, images, "gae", target=target.tolist()).maps
    assert far_from_uniform(expected)
    torch.testing.assert_close(maps, expected.reshape(3, 4, 4).detach(), atol=1e-5, rtol=1e-4)


# --- chefer: a transcription of the reference implementation --------------------------------------


def ref_safe_divide(a, b):
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


class RelProp:
    """``layers_ours.RelProp``: the forward hook keeps a detached copy of the input; relprop is identity."""

    def __call__(self, *inputs, **kwargs):
        first = inputs[0]
        if isinstance(first, (list, tuple)):
            self.X = [i.detach().requires_grad_(True) for i in first]
        else:
            self.X = first.detach().requires_grad_(True)
        return self.forward(*inputs, **kwargs)

    def gradprop(self, Z, X, S):
        return torch.autograd.grad(Z, X, S, retain_graph=True)

    def relprop(self, R, alpha):
        return R


class Fn(RelProp):
    """GELU, Softmax, LayerNorm, Dropout: subclasses of RelProp without their own rule."""

    def __init__(self, fn):
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class RelPropSimple(RelProp):
    def relprop(self, R, alpha):
        Z = self.forward(self.X)
        S = ref_safe_divide(R, Z)
        C = self.gradprop(Z, self.X, S)
        if not torch.is_tensor(self.X):
            return [self.X[0] * C[0], self.X[1] * C[1]]
        return self.X * C[0]


class Add(RelPropSimple):
    def forward(self, inputs):
        return torch.add(*inputs)

    def relprop(self, R, alpha):
        Z = self.forward(self.X)
        S = ref_safe_divide(R, Z)
        C = self.gradprop(Z, self.X, S)
        a = self.X[0] * C[0]
        b = self.X[1] * C[1]
        a_sum = a.sum()
        b_sum = b.sum()
        a_fact = ref_safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
        b_fact = ref_safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
        a = a * ref_safe_divide(a_fact, a.sum())
        b = b * ref_safe_divide(b_fact, b.sum())
        return [a, b]


class Einsum(RelPropSimple):
    def __init__(self, equation):
        self.equation = equation

    def forward(self, operands):
        return torch.einsum(self.equation, *operands)


class IndexSelect(RelProp):
    def forward(self, inputs, dim, indices):
        self.dim, self.indices = dim, indices
        return torch.index_select(inputs, dim, indices)

    def relprop(self, R, alpha):
        Z = self.forward(self.X, self.dim, self.indices)
        S = ref_safe_divide(R, Z)
        C = self.gradprop(Z, self.X, S)
        return self.X * C[0]


class Clone(RelProp):
    def forward(self, input, num):
        self.num = num
        return [input for _ in range(num)]

    def relprop(self, R, alpha):
        Z = [self.X for _ in range(self.num)]
        S = [ref_safe_divide(r, z) for r, z in zip(R, Z, strict=True)]
        C = self.gradprop(Z, self.X, S)[0]
        return self.X * C


class Linear(RelProp):
    def __init__(self, m: nn.Linear):
        self.weight, self.bias = m.weight.detach(), m.bias.detach()

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def relprop(self, R, alpha):
        beta = alpha - 1
        pw = torch.clamp(self.weight, min=0)
        nw = torch.clamp(self.weight, max=0)
        px = torch.clamp(self.X, min=0)
        nx = torch.clamp(self.X, max=0)

        def f(w1, w2, x1, x2):
            Z1 = F.linear(x1, w1)
            Z2 = F.linear(x2, w2)
            S1 = ref_safe_divide(R, Z1 + Z2)
            S2 = ref_safe_divide(R, Z1 + Z2)
            C1 = x1 * torch.autograd.grad(Z1, x1, S1)[0]
            C2 = x2 * torch.autograd.grad(Z2, x2, S2)[0]
            return C1 + C2

        activator_relevances = f(pw, nw, px, nx)
        inhibitor_relevances = f(nw, pw, px, nx)
        return alpha * activator_relevances - beta * inhibitor_relevances


class RefAttention:
    def __init__(self, attn):
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.matmul1 = Einsum("bhid,bhjd->bhij")
        self.matmul2 = Einsum("bhij,bhjd->bhid")
        self.qkv, self.proj = Linear(attn.qkv), Linear(attn.proj)
        self.attn_drop, self.proj_drop, self.softmax = Fn(lambda x: x), Fn(lambda x: x), Fn(lambda x: x.softmax(-1))

    def save_attn_gradients(self, grad):
        self.attn_gradients = grad

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # b n (qkv h d) -> qkv b h n d
        dots = self.matmul1([q, k]) * self.scale
        attn = self.attn_drop(self.softmax(dots))
        attn.register_hook(self.save_attn_gradients)
        out = self.matmul2([attn, v])
        out = out.transpose(1, 2).reshape(b, n, -1)  # b h n d -> b n (h d)
        return self.proj_drop(self.proj(out))

    def relprop(self, cam, **kwargs):
        cam = self.proj_drop.relprop(cam, **kwargs)
        cam = self.proj.relprop(cam, **kwargs)
        cam = cam.reshape(cam.shape[0], cam.shape[1], self.num_heads, -1).transpose(1, 2)  # b n (h d) -> b h n d
        (cam1, cam_v) = self.matmul2.relprop(cam, **kwargs)
        cam1 /= 2
        cam_v /= 2
        self.attn_cam = cam1
        cam1 = self.attn_drop.relprop(cam1, **kwargs)
        cam1 = self.softmax.relprop(cam1, **kwargs)
        (cam_q, cam_k) = self.matmul1.relprop(cam1, **kwargs)
        cam_q /= 2
        cam_k /= 2
        b, h, n, d = cam_q.shape
        cam_qkv = torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * h * d)
        return self.qkv.relprop(cam_qkv, **kwargs)


class RefBlock:
    def __init__(self, blk):
        self.norm1, self.norm2 = Fn(blk.norm1), Fn(blk.norm2)
        self.attn = RefAttention(blk.attn)
        self.fc1, self.act, self.fc2 = Linear(blk.mlp.fc1), Fn(F.gelu), Linear(blk.mlp.fc2)
        self.add1, self.add2, self.clone1, self.clone2 = Add(), Add(), Clone(), Clone()

    def forward(self, x):
        x1, x2 = self.clone1(x, 2)
        x = self.add1([x1, self.attn.forward(self.norm1(x2))])
        x1, x2 = self.clone2(x, 2)
        x = self.add2([x1, self.fc2(self.act(self.fc1(self.norm2(x2))))])
        return x

    def relprop(self, cam, **kwargs):
        (cam1, cam2) = self.add2.relprop(cam, **kwargs)
        cam2 = self.fc1.relprop(self.act.relprop(self.fc2.relprop(cam2, **kwargs), **kwargs), **kwargs)
        cam2 = self.norm2.relprop(cam2, **kwargs)
        cam = self.clone2.relprop((cam1, cam2), **kwargs)
        (cam1, cam2) = self.add1.relprop(cam, **kwargs)
        cam2 = self.attn.relprop(cam2, **kwargs)
        cam2 = self.norm1.relprop(cam2, **kwargs)
        return self.clone1.relprop((cam1, cam2), **kwargs)


def reference_transformer_attribution(model: nn.Module, x0: Tensor, index: int) -> Tensor:
    """``LRP.generate_LRP(x, index, method="transformer_attribution", start_layer=0)`` from the block input x0."""
    blocks = [RefBlock(b) for b in model.blocks]
    norm, pool, head = Fn(model.norm), IndexSelect(), Linear(model.head)
    x = x0.detach().requires_grad_(True)
    for blk in blocks:
        x = blk.forward(x)
    x = pool(norm(x), dim=1, indices=torch.tensor(0))
    output = head(x.squeeze(1))
    one_hot_vector = torch.zeros(1, output.shape[-1])
    one_hot_vector[0, index] = 1
    torch.sum(one_hot_vector * output).backward(retain_graph=True)
    cam = head.relprop(one_hot_vector, alpha=1).unsqueeze(1)
    cam = norm.relprop(pool.relprop(cam, alpha=1), alpha=1)
    for blk in reversed(blocks):
        cam = blk.relprop(cam, alpha=1)
    cams = []
    for blk in blocks:
        grad, cam = blk.attn.attn_gradients, blk.attn.attn_cam
        cam = cam[0].reshape(-1, cam.shape[-1], cam.shape[-1])
        grad = grad[0].reshape(-1, grad.shape[-1], grad.shape[-1])
        cams.append((grad * cam).clamp(min=0).mean(dim=0).unsqueeze(0))
    eye = torch.eye(cams[0].shape[-1]).expand(1, *cams[0].shape[-2:])  # compute_rollout_attention of ViT_LRP.py
    matrices = [c + eye for c in cams]
    joint = matrices[0]
    for m in matrices[1:]:
        joint = m.bmm(joint)
    return joint[:, 0, 1:]


def test_chefer_matches_reference_implementation(images):
    bb = backbone("vit")
    model = bb.model
    targets = [0, 4, 2]
    maps = explain(bb, images, "chefer", target=targets).maps
    with torch.no_grad():
        x0 = model.norm_pre(model._pos_embed(model.patch_embed(bb.normalize(images))))
    expected = torch.cat([reference_transformer_attribution(model, x0[i : i + 1], targets[i]) for i in range(3)])
    assert far_from_uniform(expected)
    torch.testing.assert_close(maps, expected.reshape(3, 4, 4), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(maps, explain(bb, images, "gae", target=targets).maps, atol=1e-3)  # not GAE renamed


def test_lrp_rules_are_conservative():
    g = torch.Generator().manual_seed(0)
    x, w, r = torch.randn(2, 5, 7, generator=g), torch.randn(3, 7, generator=g), torch.rand(2, 5, 3, generator=g)
    z = F.linear(x.clamp(min=0), w.clamp(min=0)) + F.linear(x.clamp(max=0), w.clamp(max=0))
    kept = r * (z > 0)  # α1β0 conserves the relevance of every output with a positive contribution
    assert (z == 0).any() and kept.sum() > 0.5 * r.sum()
    torch.testing.assert_close(_zplus(x, w, r).sum((1, 2)), kept.sum((1, 2)))
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ra, rb = _add_rule([a, b], r.repeat(1, 1, 3)[..., :7])
    torch.testing.assert_close((ra + rb).sum((1, 2)), r.repeat(1, 1, 3)[..., :7].sum((1, 2)))
    p, v = torch.rand(2, 4, 5, 5, generator=g).softmax(-1), torch.randn(2, 4, 5, 3, generator=g)
    rp, rv = _matmul_rule(p, v, torch.rand(2, 4, 5, 3, generator=g))
    torch.testing.assert_close(rp.sum(), rv.sum())


@pytest.mark.parametrize("kind", ["vit", "deit-distilled", "avg-pool-no-cls", "hf-vit", "torchvision"])
def test_relevance_is_conserved_through_every_block(kind, images):
    """One unit of relevance on the target logit arrives, still one unit, at the input of the first block."""
    bb = backbone(kind)
    with torch.no_grad():
        trace = bb.run(images)
        target = torch.nn.functional.one_hot(trace.logits.argmax(1), bb.num_classes).float()
        r, _ = _head_relevance(bb.head_parts(), trace.tokens, target, trace.num_prefix_tokens)
        torch.testing.assert_close(r.sum((1, 2)), torch.ones(3))
        for i in reversed(range(len(bb.blocks))):
            parts = bb.block_parts(bb.blocks[i])
            r_a, r_in = _lrp_block(parts, _activations(parts, trace.hidden[i]), r, to_input=True)
            torch.testing.assert_close(r_in.sum((1, 2)), r.sum((1, 2)), atol=1e-4, rtol=1e-4)
            assert r_a.shape == trace.hidden[i].shape[:1] + (parts.heads,) + (trace.hidden[i].shape[1],) * 2
            r = r_in
    torch.testing.assert_close(r.sum((1, 2)), torch.ones(3), atol=1e-4, rtol=1e-4)


def test_chefer_layer_scale_and_qk_norm_are_supported_and_other_blocks_refused(images):
    bb = adapt(sharpen(timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
        num_classes=5, init_values=0.5, qk_norm=True,
    )))  # fmt: skip
    maps = explain(bb, images, "chefer").maps
    assert maps.shape == (3, 4, 4) and torch.isfinite(maps).all() and maps.std() > 0
    from timm.models.vision_transformer import ResPostBlock

    post = adapt(timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
        num_classes=5, block_fn=ResPostBlock,
    ).eval())  # fmt: skip
    with pytest.raises(VitlensError, match="chefer.*ResPostBlock"):
        explain(post, images, "chefer")
    assert explain(post, images, "gae").maps.shape == (3, 4, 4)  # GAE needs only the attention maps


# --- flow: Edmonds–Karp on the attention graph ----------------------------------------------------


def edmonds_karp(capacity: dict, source, sink) -> float:
    """Max-flow by shortest augmenting paths on a dict-of-dicts of float capacities."""
    residual: dict = {u: dict(vs) for u, vs in capacity.items()}
    for u, vs in capacity.items():
        for v in vs:
            residual.setdefault(v, {}).setdefault(u, 0.0)
    flow = 0.0
    while True:
        parent, queue = {source: None}, deque([source])
        while queue and sink not in parent:
            u = queue.popleft()
            for v, c in residual[u].items():
                if c > 1e-12 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if sink not in parent:
            return flow
        path, v = [], sink
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        bottleneck = min(residual[u][v] for u, v in path)
        for u, v in path:
            residual[u][v] -= bottleneck
            residual[v][u] += bottleneck
        flow += bottleneck


def flow_by_hand(attentions: list[Tensor], readout: Tensor) -> Tensor:
    """Abnar & Zuidema: Â = 0.5·mean_h A + 0.5·I; edges (l, i) → (l−1, j); flows normalised over inputs."""
    t = attentions[0].shape[-1]
    mats = [0.5 * a.mean(0) + 0.5 * torch.eye(t) for a in attentions]
    capacity: dict = {}
    for layer, m in enumerate(mats, 1):
        for i in range(t):
            capacity[(layer, i)] = {(layer - 1, j): float(m[i, j]) for j in range(t)}
    heads = [i for i in range(t) if readout[i] > 0]
    if len(heads) == 1:  # a class token: their graph, flow from the top class-token node itself
        source = (len(mats), heads[0])
    else:
        source = "readout"
        capacity[source] = {(len(mats), i): float(readout[i]) for i in heads}
    flows = torch.tensor([edmonds_karp(capacity, source, (0, j)) for j in range(t)])
    return flows / flows.sum()


@pytest.mark.parametrize("variant", ["vit", "deit-distilled"])
def test_flow_matches_edmonds_karp(variant, images):
    bb = backbone(variant)
    images = images[:2]
    maps = explain(bb, images, "flow").maps
    with torch.no_grad():
        attentions = bb.run(images, attention=True).attentions
    p = bb.num_prefix_tokens
    readout = bb.readout(attentions[0].shape[-1])
    expected = torch.stack([flow_by_hand([a[i] for a in attentions], readout)[p:] for i in range(2)])
    assert far_from_uniform(expected)
    torch.testing.assert_close(maps, expected.reshape(2, 4, 4).float(), atol=2e-5, rtol=1e-4)


def test_flow_refuses_too_many_tokens(images):
    with pytest.raises(VitlensError, match="max_tokens"):
        explain(backbone("vit"), images, "flow", max_tokens=10)


# --- the contract, on every backbone family -------------------------------------------------------


def attention_state(bb) -> list:
    if bb.family == "timm":
        return [blk.attn.fused_attn for blk in bb.blocks]
    if bb.family == "hf":
        return [bb.model.config._attn_implementation]
    return ["forward" in blk.self_attention.__dict__ for blk in bb.blocks]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", TIMM + HF_TV)
def test_contract(method, kind, images):
    bb = backbone(kind)
    next(bb.parameters()).requires_grad_(False)
    bb.train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    grad_flags = [p.requires_grad for p in bb.parameters()]
    attention = attention_state(bb)
    maps = explain(bb, images, method).maps
    assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert (maps.flatten(1).std(1) > 1e-6).all()  # no image gets a constant map
    single = torch.cat([explain(bb, images[i : i + 1], method).maps for i in range(3)])
    torch.testing.assert_close(single, maps, atol=1e-5, rtol=1e-4)
    assert all(m.training for m in bb.modules())
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    assert [p.requires_grad for p in bb.parameters()] == grad_flags
    assert all(p.grad is None for p in bb.parameters())
    assert all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in bb.modules())
    assert attention_state(bb) == attention


@pytest.mark.parametrize("method", ["gae", "chefer"])
def test_targets(method, images):
    bb = backbone("vit")
    with torch.no_grad():
        predicted = bb(images).argmax(1)
    default = explain(bb, images, method).maps
    torch.testing.assert_close(default, explain(bb, images, method, target=predicted.tolist()).maps)
    other = [(int(c) + 1) % 5 for c in predicted]
    per_image = explain(bb, images, method, target=other).maps
    assert not torch.allclose(per_image, default, atol=1e-4)  # class-dependent
    for i in range(3):
        torch.testing.assert_close(per_image[i], explain(bb, images, method, target=other[i]).maps[i])
    with pytest.raises(VitlensError, match="out of range"):
        explain(bb, images, method, target=5)
    with pytest.raises(VitlensError, match="targets"):
        explain(bb, images, method, target=[0, 1])


def test_flow_ignores_the_target(images):
    bb = backbone("vit")
    torch.testing.assert_close(explain(bb, images, "flow", target=1).maps, explain(bb, images, "flow").maps)


def test_gae_works_under_no_grad(images):
    bb = backbone("vit")
    with torch.no_grad():
        maps = explain(bb, images, "gae").maps
    torch.testing.assert_close(maps, explain(bb, images, "gae").maps)
