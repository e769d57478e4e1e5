"""The attention-gradient family: GAE, transformer attribution (LRP) and attention flow.

- ``gae``: Chefer, Gur, Wolf, *Generic Attention-model Explainability for Interpreting Bi-Modal and
  Encoder-Decoder Transformers*, ICCV 2021 (self-attention rules 5 and 6).
- ``chefer``: Chefer, Gur, Wolf, *Transformer Interpretability Beyond Attention Visualization*, CVPR 2021
  ("transformer attribution"), with the propagation rules of the authors' reference implementation
  (github.com/hila-chefer/Transformer-Explainability, ``modules/layers_ours.py`` and
  ``baselines/ViT/ViT_LRP.py``).
- ``flow``: Abnar & Zuidema, *Quantifying Attention Flow in Transformers*, ACL 2020 (attention flow).

GAE and transformer attribution both roll out per-block matrices Ā_b with the identity,
R = (I + Ā_L)(I + Ā_{L−1})⋯(I + Ā_1), and read the row of the model's readout: r·R is computed as
vector-matrix products from the last block down (never forming T×T products).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import Backbone, Trace, to_grid
from ..backbones.parts import Affine, BlockParts, HeadParts, UnsupportedParts
from ..backbones.probe import AttentionProbe
from ..errors import VitlensError
from .attention import block_index, identity_rows, probed_run, readout_rollout
from .base import Explainer, register, verify_once
from .targets import Target


def _cpu_autocast_enabled() -> bool:
    """Whether autocast is on for the CPU (``torch.is_autocast_enabled`` takes a device from torch 2.4)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()


def rollout_with_identity(mats: Sequence[Tensor], start: Tensor) -> Tensor:
    """``start · (I + Ā_L) ⋯ (I + Ā_1)`` for per-block matrices ``mats`` [B, T, T] and rows ``start`` [B, T].

    This is the readout row of the relevance matrix R of Chefer et al. (R ← R + Ā_b·R from R = I, block 1
    first), computed from the last block down as ``row ← row + row·Ā_b``.
    """
    row = start
    for a in reversed(mats):
        row = row + torch.bmm(row[:, None], a)[:, 0]
    return row


def probe_gradients(
    backbone: Backbone, images: Tensor, target: Target, blocks: Sequence[int] | None = None
) -> tuple[Trace, AttentionProbe]:
    """One forward pass (the model's own attention kernel) and one backward: ∂ score / ∂ A_b of ``blocks``.

    The graph starts at the input of the first block (``grad_from=0``) and no parameter gradients are
    computed. Returns the trace and the probe; ``probe.gradient(b, rows)`` and ``probe.probabilities(b, rows)``
    give a block's attention gradient and probabilities for the rows asked for. Under autocast on the CPU the
    explicit path's matrices are read instead (as training computes attention there): PyTorch's 16-bit
    flash-attention backward on the CPU is several times slower than the explicit matrix products.
    """
    cpu_autocast = images.device.type == "cpu" and _cpu_autocast_enabled()
    probing = partial(Backbone.probe_attention, backbone) if cpu_autocast else backbone.probe_attention
    with torch.enable_grad(), probing(blocks, gradients=True) as probe:
        trace = backbone.run(images, grad_from=0)
        probe.backward(target.fixed(trace.logits).score(trace.logits).sum())
    return trace, probe


def attention_gradients(backbone: Backbone, images: Tensor, target: Target) -> tuple[Trace, tuple[Tensor, ...]]:
    """∂ score / ∂ A_b [B, heads, T, T] for every block, from one forward and one backward (:func:`probe_gradients`).

    Returns the trace (without ``attentions``) and the gradients.
    """
    trace, probe = probe_gradients(backbone, images, target)
    with torch.no_grad():
        return trace, tuple(probe.gradient(b) for b in probe.blocks)


@register
class GAE(Explainer):
    """Chefer et al. ICCV 2021: Ā_b = E_h[(∇A_b ⊙ A_b)⁺], R ← R + Ā_b·R from R = I; the readout row of R.

    The model's own attention kernel runs; A_b is recomputed from the block's queries and keys and
    ∇A_b = (∂score/∂O_b)·V_bᵀ from its per-head output O_b = A_b V_b, for the rows the readout row reads.
    """

    name = "gae"
    needs_global_attention = True
    paper = "Chefer, Gur, Wolf, Generic Attention-model Explainability, ICCV 2021"
    cost = "1 forward + 1 backward (+ every block's attention and its gradient recomputed)"
    meaning = "attention weighted by its gradient for the target, positive part, rolled out over the blocks"

    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        bb = self.backbone
        trace, probe = probe_gradients(bb, images, target)
        with torch.no_grad():
            t = trace.hidden[0].shape[1]

            def with_identity(b: int, rows: slice | None) -> Tensor:  # I + Ā_b, rows of it
                a = probe.gradient(b, rows).mul_(probe.probabilities(b, rows)).clamp_(min=0).mean(1)
                return a.add_(identity_rows(rows, t, a))

            row = readout_rollout(bb.readout(t), len(images), probe.blocks, with_identity)
            return trace.to_grid(row[:, trace.num_prefix_tokens :]), trace.logits.detach()


# --- transformer attribution (LRP) ----------------------------------------------------------------


@dataclass
class _Activations:
    """One block's forward pass, every tensor an LRP rule reads (``f1``: fc1's output before the activation;
    ``q``, ``k``: after the rotary embedding, ``q0``, ``k0`` before it; ``u``, ``gated``: the gated MLP's
    two factors, ``None`` without a gate)."""

    x: Tensor
    h1: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    qkv: Tensor
    a: Tensor
    o: Tensor
    y: Tensor
    mid: Tensor
    h2: Tensor
    f1: Tensor
    g: Tensor
    mlp: Tensor
    out: Tensor
    grid: tuple[int, int] | None = None
    q0: Tensor | None = None
    k0: Tensor | None = None
    u: Tensor | None = None
    gated: Tensor | None = None


def _refuse(what: str) -> VitlensError:
    return VitlensError(
        f"method 'chefer' has no LRP rules for {what}; it supports standard pre-norm ViT blocks "
        "(use 'gae', which needs only the attention maps)"
    )


def _safe_divide(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """a / b with the reference's stabiliser: a / (b + eps) (eps where that is 0), and 0 where b is exactly 0."""
    den = b + eps
    den.masked_fill_(den == 0, eps)
    return (a / den).masked_fill_(b == 0, 0.0)


def _zplus(x: Tensor, w: Tensor, r: Tensor, xw: Tensor | None = None) -> Tensor:
    """LRP-αβ with α = 1, β = 0 through a linear layer (bias ignored), as the reference's ``Linear.relprop``.

    R_in = x⁺ ⊙ (s W⁺) + x⁻ ⊙ (s W⁻) with s = R_out / (x⁺W⁺ᵀ + x⁻W⁻ᵀ + 1e-9): conservative. Computed with
    three products the size of the layer instead of four, using 2·(x⁺W⁺ᵀ + x⁻W⁻ᵀ) = xWᵀ + |x||W|ᵀ, where
    ``xw`` = xWᵀ comes from the forward pass, and 2·(x⁺ ⊙ sW⁺ + x⁻ ⊙ sW⁻) = x ⊙ sW + |x| ⊙ s|W|: with
    s' = R_out / (xWᵀ + |x||W|ᵀ + 2e-9) = s / 2, R_in = x ⊙ s'W + |x| ⊙ s'|W|.
    """
    wa, xa = w.abs(), x.abs()
    if xw is None:
        xw = F.linear(x, w)
    z2 = torch.addmm(xw.reshape(-1, w.shape[0]), xa.reshape(-1, w.shape[1]), wa.t()).view(xw.shape)
    s = _safe_divide(r, z2, 2e-9)
    return torch.addcmul(x * (s @ w), xa, s @ wa)


def _add_rule(xs: Sequence[Tensor], r: Tensor) -> list[Tensor]:
    """The paper's conservative rule for a sum of tensors (reference ``Add.relprop``), per image.

    Each operand gets its z-rule share x_i·R/Σx, rescaled so that its total is |Σ share_i| / Σ_j |Σ share_j|
    of the image's total relevance. The reference sums over the whole (batch-of-one) tensor; here every
    sum is per image, so an image's map does not depend on its batch-mates.
    """
    s = _safe_divide(r, sum(xs))
    shares = [x * s for x in xs]
    totals = [p.flatten(1).sum(1) for p in shares]
    norm = sum(t.abs() for t in totals)
    r_total = r.flatten(1).sum(1)
    out = []
    for p, t in zip(shares, totals, strict=True):
        factor = _safe_divide(_safe_divide(t.abs(), norm) * r_total, t)
        out.append(p.mul_(factor.view(-1, *[1] * (p.ndim - 1))))
    return out


def _matmul_rule(
    a: Tensor, b: Tensor, r: Tensor, ab: Tensor | None = None, elementwise: bool = False
) -> tuple[Tensor, Tensor]:
    """Relevance of both factors of ``a @ b`` (``ab``, when the forward pass has it), each halved (the
    reference's ``einsum`` rule in attention); ``elementwise``: of the product ``a * b`` (a gated MLP)."""
    if elementwise:
        s = _safe_divide(r, a * b if ab is None else ab)
        return a * (s * b) / 2, b * (s * a) / 2
    s = _safe_divide(r, a @ b if ab is None else ab)
    return a * (s @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ s) / 2


def _activations(p: BlockParts, x: Tensor, grid: tuple[int, int] | None = None) -> _Activations:
    """Recompute one block from its input ``x`` [B, T, D], keeping every tensor an LRP rule reads (``grid``:
    the patch grid, for a rotary embedding)."""
    b, t, _ = x.shape
    h1 = p.norm1(x)
    qkv = F.linear(h1, *p.qkv)
    q, k, v = qkv.reshape(b, t, 3, p.heads, -1).permute(2, 0, 3, 1, 4)
    q0, k0 = q, k = p.q_norm(q), p.k_norm(k)
    if p.rope is not None:
        q, k = p.rope(q0, grid), p.rope(k0, grid)
    logits = (q * p.scale) @ k.transpose(-2, -1)
    a = (logits if p.attn_bias is None else logits + p.attn_bias(t)).softmax(-1)
    o = p.out_norm((a @ v).transpose(1, 2).reshape(b, t, -1))
    y = F.linear(o, *p.proj)
    mid = x + y
    h2 = p.norm2(mid)
    f1 = F.linear(h2, *p.fc1)
    u = p.act(f1)
    gated = None if p.gate is None else F.linear(h2, *p.gate)
    g = p.mlp_norm(u if gated is None else u * gated)
    mlp = F.linear(g, *p.fc2)
    return _Activations(x, h1, q, k, v, qkv, a, o, y, mid, h2, f1, g, mlp, mid + mlp, grid, q0, k0, u, gated)


def _unbiased(out: Tensor, affine: Affine) -> Tensor:
    """A linear layer's output without its bias: xWᵀ, recovered from the forward pass's xWᵀ + b."""
    return out if affine[1] is None else out - affine[1]


def _rope_rule(p: BlockParts, x0: Tensor, x: Tensor, r: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """The z-rule through the rotary embedding ``x = rope(x0)`` (linear at each position): x0 ⊙ Jᵀ(R / x)."""
    with torch.enable_grad():
        leaf = x0.detach().requires_grad_(True)
        (back,) = torch.autograd.grad(p.rope(leaf, grid), leaf, _safe_divide(r, x))
    return x0 * back


def _lrp_block(p: BlockParts, c: _Activations, r_out: Tensor, to_input: bool) -> tuple[Tensor, Tensor | None]:
    """Relevance of the block's output [B, T, D] → (R_A [B, heads, T, T], relevance of its input or None)."""
    r_mid, r_mlp = _add_rule([c.mid, c.mlp], r_out)
    r_g = _zplus(c.g, p.fc2[0], r_mlp, _unbiased(c.mlp, p.fc2))
    if c.gated is None:
        r_h2 = _zplus(c.h2, p.fc1[0], r_g, _unbiased(c.f1, p.fc1))
    else:  # the gated product: the halved product rule, as in attention; the two branches add up at h2
        r_u, r_gated = _matmul_rule(c.u, c.gated, r_g, c.u * c.gated, elementwise=True)
        r_h2 = _zplus(c.h2, p.fc1[0], r_u, _unbiased(c.f1, p.fc1))
        r_h2 = r_h2 + _zplus(c.h2, p.gate[0], r_gated, _unbiased(c.gated, p.gate))
    r_mid = r_mid + r_h2  # clone: the two paths add up
    r_x, r_y = _add_rule([c.x, c.y], r_mid)
    b, t, _ = r_y.shape
    r_o = _zplus(c.o, p.proj[0], r_y, _unbiased(c.y, p.proj)).reshape(b, t, p.heads, -1).transpose(1, 2)
    av = c.o.reshape(b, t, p.heads, -1).transpose(1, 2) if isinstance(p.out_norm, nn.Identity) else None
    r_a, r_v = _matmul_rule(c.a, c.v, r_o, av)
    if not to_input:
        return r_a, None
    r_q, r_kt = _matmul_rule(c.q, c.k.transpose(-2, -1), r_a)  # softmax (and a constant bias) pass it unchanged
    r_k = r_kt.transpose(-2, -1)
    if p.rope is not None:
        r_q, r_k = _rope_rule(p, c.q0, c.q, r_q, c.grid), _rope_rule(p, c.k0, c.k, r_k, c.grid)
    r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(b, t, -1)
    return r_a, r_x + _zplus(c.h1, p.qkv[0], r_qkv, _unbiased(c.qkv, p.qkv))


def _head_relevance(head: HeadParts, tokens: Tensor, start: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Relevance of the final tokens [B, T, D] from the relevance ``start`` [B, C] on the logits: one-hot on
    the target class (total 1), or the score function's gradient with respect to the logits.

    Also returns the logits recomputed from the parts (to check them against the model's).
    One head: the α1β0 rule through it (the class token, or the patch mean with the z-rule through the
    average, as the reference's pooling layers). Two heads (distilled): the add rule splits the relevance
    between them first.
    """
    pooled = [tokens[:, i] if i is not None else tokens[:, num_prefix:].mean(1) for i, _ in head.heads]
    feats = [head.pre(z) for z in pooled]
    logits = [F.linear(f, *affine) for f, (_, affine) in zip(feats, head.heads, strict=True)]
    start = start.to(tokens.dtype)
    shares = _add_rule(logits, start) if len(logits) > 1 else [start]
    r = torch.zeros_like(tokens)
    for (i, (w, _)), z, f, share in zip(head.heads, pooled, feats, shares, strict=True):
        r_feat = _zplus(f, w, share)  # the norm before the head passes relevance unchanged
        if i is None:
            patches = tokens[:, num_prefix:]
            r[:, num_prefix:] += patches * _safe_divide(r_feat, z * patches.shape[1])[:, None]
        else:
            r[:, i] += r_feat
    return r, sum(logits) / len(logits)


def _check_reproduced(ours: Tensor, theirs: Tensor, what: str) -> None:
    if (ours - theirs).abs().max() > 1e-3 * theirs.abs().max() + 1e-5:
        raise _refuse(f"this model: recomputing {what} from its parts does not reproduce the model")


@dataclass
class _PartsPass:
    """One forward pass computed from the blocks' parts: what both the gradient and the LRP rules read."""

    blocks: list[tuple[BlockParts, _Activations]]
    tokens: Tensor
    logits: Tensor
    grid: tuple[int, int]


def forward_parts(backbone: Backbone, images: Tensor) -> _PartsPass:
    """The model's forward pass recomputed from ``Backbone.block_parts``, keeping every block's activations.

    The graph starts at the input of the first block (a leaf that requires grad; no parameter gradients),
    so ∂ logit / ∂ A_b comes from the same pass whose activations the LRP rules read: one forward for both.
    """
    with torch.no_grad():
        embeddings, grid = backbone.embed(backbone.normalize(images))
        x = backbone.add_prefix_and_position(embeddings, grid)
    x = x.detach().requires_grad_(True)
    blocks = []
    for block in backbone.blocks:
        parts = backbone.block_parts(block)
        c = _activations(parts, x, grid)
        blocks.append((parts, c))
        x = c.out
    tokens = backbone.final_norm(x)
    return _PartsPass(blocks, tokens, backbone.head(tokens), grid)


def _check_against_model(backbone: Backbone, image: Tensor) -> None:
    """:func:`forward_parts` reproduces the model's own forward pass (blocks, attention maps, logits) on
    ``image`` [1, 3, H, W], in float32 also under autocast (the check is about the architecture)."""
    with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
        ref = backbone.run(image, attention=True)
        ours = forward_parts(backbone, image)
    for i, (_, c) in enumerate(ours.blocks):
        _check_reproduced(c.out, ref.hidden[i + 1], f"block {i}")
        _check_reproduced(c.a, ref.attentions[i], f"the attention of block {i}")
    _check_reproduced(ours.logits, ref.logits, "the logits")


def transformer_attribution_mats(backbone: Backbone, run: _PartsPass, start: Tensor, grads: Sequence[Tensor]):
    """Ā_b = E_h[(∇A_b ⊙ R_A_b)⁺] for every block [B, T, T], R_A_b by LRP from the relevance ``start`` on
    the logits [B, C] down.

    Blocks are taken from the top and dropped from ``run`` once used, so memory shrinks as the pass goes
    down. The first block's q/k/v are not propagated (nothing below its attention map is read).
    """
    num_prefix = backbone.num_prefix_tokens
    tokens, logits = run.tokens.detach(), run.logits.detach()
    r, head_logits = _head_relevance(backbone.head_parts(), tokens, start, num_prefix)
    _check_reproduced(head_logits, logits, "the classifier")
    mats = []
    for i in reversed(range(len(run.blocks))):
        parts, c = run.blocks.pop()
        r_a, r = _lrp_block(parts, c, r, to_input=i > 0)
        mats.append((grads[i] * r_a).clamp(min=0).mean(1))
    return mats[::-1]


@register
class Chefer(Explainer):
    """Chefer et al. CVPR 2021, transformer attribution: Ā_b = E_h[(∇A_b ⊙ R_A_b)⁺], rolled out with I.

    R_A_b is the LRP relevance of block b's attention map, propagated from the target logit (relevance
    1) with the reference implementation's rules: α1β0 for linear layers (bias ignored), the
    normalised add rule for residuals, the halved product rule for both attention matmuls, and
    LayerNorm / GELU / softmax / dropout passing relevance unchanged. Then R = ∏(I + Ā_b) (the reference's
    ``generate_LRP(method="transformer_attribution", start_layer=0)``) and the readout row of R.
    Extensions beyond the reference (which has one class token and batch size 1): per-image sums in the
    add rule, distillation heads split by the add rule, average pooling by the z-rule, layer scale folded
    into the projections, qk-norm / MLP norms treated as LayerNorm, an attention bias as a constant (the
    relevance of the attention logits goes to q kᵀ), rotary embeddings by the z-rule through their
    rotation, and a gated MLP's product by the halved product rule.

    One forward pass, recomputed from the blocks' parts (:func:`forward_parts`), gives both the attention
    gradients and the activations the LRP rules read; the first call of an explainer checks that
    recomputation against the model's own forward on one image. A score function as the target starts
    the relevance from its gradient with respect to the logits (one-hot for a class).

    Args:
        start_layer: the first block rolled out (0: all blocks; Chefer et al.'s evaluation uses 1).
    """

    name = "chefer"
    needs_global_attention = True
    paper = "Chefer, Gur, Wolf, Transformer Interpretability Beyond Attention Visualization, CVPR 2021"
    cost = "1 forward + 1 backward + 1 LRP pass (explicit attention)"
    meaning = "LRP relevance of the attention weighted by its gradient for the target, rolled out (positive)"

    def __init__(self, model, *, start_layer: int = 0):
        super().__init__(model)
        self.start_layer = block_index(self.name, "start_layer", start_layer, len(self.backbone.blocks))

    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        try:
            return self._explain(images, target)
        except UnsupportedParts as e:
            raise _refuse(e.what) from None

    def _explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        bb = self.backbone
        verify_once(bb, "chefer-parts", lambda: _check_against_model(bb, images[:1]))
        with torch.enable_grad():
            run = forward_parts(bb, images)
            score = target.fixed(run.logits).score(run.logits).sum()
            relevance, *grads = torch.autograd.grad(score, [run.logits, *[c.a for _, c in run.blocks]])
        with torch.no_grad():
            mats = transformer_attribution_mats(bb, run, relevance, grads)[self.start_layer :]
            t = mats[0].shape[-1]
            start = bb.readout(t).to(mats[0].device, mats[0].dtype, non_blocking=True).expand(mats[0].shape[0], t)
            row = rollout_with_identity(mats, start)[:, bb.num_prefix_tokens :]
            return to_grid(row, run.grid), run.logits.detach()


# --- attention flow -------------------------------------------------------------------------------

_FLOW_SCALE = 1e6  # capacities become integers (scipy's max-flow solvers need them): 1e-6 resolution


def _input_flows(mats: np.ndarray, readout: np.ndarray) -> np.ndarray:
    """Max-flow from the readout to every input token through the layered attention graph [T].

    ``mats`` [L, T, T] are the residual-augmented attention matrices; node (l, i) has an edge to node
    (l−1, j) of capacity mats[l−1, i, j]. A source feeds the top-layer readout tokens with capacities
    ``readout`` (for a class-token model: one edge of capacity 1 that never binds, i.e. the flow of
    the class token itself). Flows are normalised to sum 1 over the input tokens, as in Abnar &
    Zuidema's code.
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    layers, t, _ = mats.shape
    source = (layers + 1) * t
    tokens = np.arange(t)
    upper = range(1, layers + 1)
    rows = [np.full(t, source)] + [np.repeat(layer * t + tokens, t) for layer in upper]
    cols = [layers * t + tokens] + [np.tile((layer - 1) * t + tokens, t) for layer in upper]
    caps = np.rint(np.concatenate([readout, mats.reshape(-1)]) * _FLOW_SCALE).astype(np.int32)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    keep = caps > 0
    graph = csr_array((caps[keep], (rows[keep], cols[keep])), shape=(source + 1, source + 1))
    graph.indices, graph.indptr = graph.indices.astype(np.int32), graph.indptr.astype(np.int32)  # scipy < 1.12
    flows = np.array([maximum_flow(graph, source, j).flow_value for j in range(t)], dtype=np.float64)
    return flows / flows.sum()


@register
class Flow(Explainer):
    """Abnar & Zuidema 2020, attention flow: max-flow from each input patch to the readout token(s).

    Edge capacities are the heads' mean attention with the residual added, Â = 0.5·A + 0.5·I. Slow: one
    max-flow per token per image on a graph of (L+1)·T nodes and L·T² edges, solved on the CPU with
    scipy: 0.1–0.3 s per max-flow, so ~30 s per image for ViT-B/16 at 224 px (197 tokens, 12 blocks).
    The loop over images and tokens is the one exception to vitlens' no-per-image-loops rule: max-flow
    does not batch. ``max_tokens`` refuses larger models.
    The map does not depend on the target class.

    Args:
        max_tokens: refuse models with more tokens than this (the cost grows with T³).
    """

    name = "flow"
    needs_global_attention = True
    paper = "Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020 (attention flow)"
    cost = "1 forward + T max-flows per image on CPU (slow: ~30 s per image at 197 tokens, 12 blocks)"
    meaning = "the maximum attention flow from each patch to the readout token (class-agnostic)"
    class_specific = False

    def __init__(self, model, *, max_tokens: int = 256):
        super().__init__(model)
        self.max_tokens = max_tokens

    @torch.no_grad()
    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        trace, probe = probed_run(self.backbone, images)
        t = trace.hidden[0].shape[1]
        if t > self.max_tokens:
            raise VitlensError(
                f"method 'flow' solves one max-flow per token per image: {t} tokens exceed max_tokens="
                f"{self.max_tokens} (raise it if you accept the cost, or use 'rollout')"
            )
        eye = torch.eye(t, device=images.device)
        mats = [0.5 * probe.probabilities(b).mean(1) + 0.5 * eye for b in probe.blocks]
        mats = torch.stack(mats, 1).double().cpu().numpy()
        readout = self.backbone.readout(t).double().cpu().numpy()
        flows = np.stack([_input_flows(m, readout) for m in mats])
        flows = torch.as_tensor(flows, dtype=images.dtype, device=images.device)
        return trace.to_grid(flows[:, trace.num_prefix_tokens :]), trace.logits
