"""AttnLRP: Achtibat et al., *AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers*,
ICML 2024, computed as the authors' library LXT computes it ("efficient" mode): one forward pass in which
some operations have modified gradients, one backward pass, and relevance = input × gradient.

The rules, each as the gradient that makes input × gradient the rule's relevance:

- linear layers (projections, classifier, rotary embeddings, pooling): the plain gradient, i.e. the
  ε-rule with ε → 0 (biases keep their share);
- LayerNorm / RMSNorm: the identity rule, the normalising standard deviation treated as a constant
  (LXT's ``layer_norm_forward`` / ``rms_norm_forward``);
- element-wise activations (GELU, SiLU, …): the identity rule, gradient ``f(x) / x`` (LXT's
  ``identity_rule_implicit``);
- the two attention products and a gated MLP's product: the uniform rule, half the relevance to each
  factor (LXT divides the gradients of q and k by 4 and of v by 2, and of a gated product by 2);
- softmax: its plain gradient, which makes input × gradient the rule of the paper's Proposition 3.1,
  ``x ⊙ (R − s · ΣR)`` (LXT's explicit ``softmax`` rule);
- ``attention="cp"``: the attention weights as constants instead (CP-LRP, Ali et al. ICML 2022), LXT's
  default patch for torchvision's ViT.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from ..backbones import Backbone, to_grid
from ..backbones.parts import BlockParts, HeadParts, UnsupportedParts
from ..errors import VitlensError
from .base import Explainer, register, verify_once
from .targets import Target


class _DivideGradient(Function):
    """The identity forward; the gradient divided by ``factor`` (LXT's ``divide_gradient``: the uniform rule)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad / ctx.factor, None


class _IdentityRule(Function):
    """``fn(x)`` with gradient ``fn(x) / x``, so input × gradient passes the relevance through unchanged
    (LXT's ``identity_rule_implicit``, with its 1e-10 in the denominator)."""

    @staticmethod
    def forward(ctx, fn, x: Tensor) -> Tensor:
        y = fn(x)
        ctx.save_for_backward(y / (x + 1e-10))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, ctx.saved_tensors[0] * grad


def divide_gradient(x: Tensor, factor: float) -> Tensor:
    return _DivideGradient.apply(x, factor)


def identity_rule(fn, x: Tensor) -> Tensor:
    return _IdentityRule.apply(fn, x)


def _layer_norm_rule(m: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm with its standard deviation treated as a constant (LXT's ``layer_norm_forward``)."""
    mean = x.mean(-1, keepdim=True)
    std = (((x - mean) ** 2).mean(-1, keepdim=True) + m.eps).sqrt()
    y = (x - mean) / std.detach()
    if m.weight is not None:
        y = y * m.weight
    return y if m.bias is None else y + m.bias


def _rms_norm_rule(m: nn.Module, x: Tensor) -> Tensor:
    """RMSNorm with its scale treated as a constant (LXT's ``rms_norm_forward``)."""
    eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()
    return y if m.weight is None else y * m.weight


def _rms_norm_types() -> tuple[type, ...]:
    types: list[type] = [nn.RMSNorm] if hasattr(nn, "RMSNorm") else []  # torch >= 2.4
    with contextlib.suppress(ImportError):
        from timm.layers import RmsNorm

        types.append(RmsNorm)
    return tuple(types)


def _norm_rule(m: object):
    """The identity rule's forward for a normalisation module, ``None`` for other modules."""
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return _layer_norm_rule
    if isinstance(m, _rms_norm_types()) and len(m.normalized_shape) == 1:
        return _rms_norm_rule
    return None


@contextlib.contextmanager
def norm_rules(model: nn.Module) -> Iterator[None]:
    """Every LayerNorm / RMSNorm of ``model`` computes with its scale treated as a constant (the identity
    rule) for the duration; the modules' own ``forward`` is restored on exit, even on error.

    The rule reaches the norms inside the family's own steps too (timm's ``norm_pre``, the final norm).
    """
    patched = []
    try:
        for m in model.modules():
            rule = _norm_rule(m)
            if rule is not None:
                patched.append((m, m.__dict__.get("forward")))
                m.forward = functools.partial(rule, m)
        yield
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own


def _check_norms(p: BlockParts) -> None:
    for norm in (p.norm1, p.q_norm, p.k_norm, p.out_norm, p.norm2, p.mlp_norm):
        if not isinstance(norm, nn.Identity) and _norm_rule(norm) is None:
            raise UnsupportedParts(f"{type(norm).__name__} normalisation")


def lrp_block(p: BlockParts, x: Tensor, grid: tuple[int, int], cp: bool = False) -> Tensor:
    """One pre-norm block from its parts, with AttnLRP's modified gradients (norms: under :func:`norm_rules`).

    ``cp``: the attention weights are constants (CP-LRP) instead of the uniform and softmax rules.
    """
    b, t, _ = x.shape
    qkv = F.linear(p.norm1(x), *p.qkv)
    q, k, v = qkv.reshape(b, t, 3, p.heads, -1).permute(2, 0, 3, 1, 4)
    q, k = p.q_norm(q), p.k_norm(k)
    if p.rope is not None:  # linear in q and k at each position: the plain gradient
        q, k = p.rope(q, grid), p.rope(k, grid)
    if cp:
        q, k = q.detach(), k.detach()
    else:  # uniform rule on both products: q and k share A's half, v gets half of the output's
        q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    logits = (q * p.scale) @ k.transpose(-2, -1)
    if p.attn_bias is not None:
        logits = logits + p.attn_bias(t)
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
    x = x + F.linear(p.out_norm(o), *p.proj)
    h = p.norm2(x)
    hidden = identity_rule(p.act, F.linear(h, *p.fc1))
    if p.gate is not None:
        hidden = divide_gradient(hidden * F.linear(h, *p.gate), 2)
    return x + F.linear(p.mlp_norm(hidden), *p.fc2)


def lrp_head(head: HeadParts, tokens: Tensor, num_prefix: int) -> Tensor:
    """The classifier from its parts (pooling and heads linear; ``pre`` under :func:`norm_rules`)."""
    pooled = [tokens[:, i] if i is not None else tokens[:, num_prefix:].mean(1) for i, _ in head.heads]
    pre = head.pre_constant_scale or head.pre
    return sum(F.linear(pre(z), *affine) for z, (_, affine) in zip(pooled, head.heads, strict=True)) / len(head.heads)


def attnlrp_pass(backbone: Backbone, images: Tensor, cp: bool = False) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The forward pass with AttnLRP's modified gradients, from the patch embeddings on.

    Returns the patch embeddings (a leaf that requires grad: relevance = embeddings × gradient), the logits
    and the patch grid. No parameter gradients are computed.
    """
    with torch.no_grad():
        embeddings, grid = backbone.embed(backbone.normalize(images))
    embeddings = embeddings.detach().requires_grad_(True)
    parts = [backbone.block_parts(block) for block in backbone.blocks]
    head = backbone.head_parts()
    for p in parts:
        _check_norms(p)
    if not isinstance(head.pre, nn.Identity) and _norm_rule(head.pre) is None and head.pre_constant_scale is None:
        raise UnsupportedParts(f"a {type(head.pre).__name__} before the classifier")
    with norm_rules(backbone):
        x = backbone.add_prefix_and_position(embeddings, grid)
        for p in parts:
            x = lrp_block(p, x, grid, cp)
        logits = lrp_head(head, backbone.final_norm(x), backbone.num_prefix_tokens)
    return embeddings, logits, grid


def _refuse(what: str) -> VitlensError:
    return VitlensError(
        f"method 'attnlrp' has no LRP rules for {what}; it supports pre-norm ViT blocks "
        "(use 'inputxgrad' or 'gae', which need no rules)"
    )


@register
class AttnLRP(Explainer):
    """Achtibat et al. ICML 2024 (AttnLRP), as LXT computes it: relevance = patch embedding × modified gradient.

    One forward pass recomputed from the blocks' parts with the rules' modified gradients (ε-rule for linear
    layers, identity rule for norms and activations, uniform rule for the attention products and gated MLPs,
    the softmax rule), one backward pass; the relevance of each patch is its embedding times the gradient,
    summed over the embedding dimensions. Signed: positive patches speak for the target.
    What is conserved: the relevance of every input of the modified network (patch embeddings, class and
    register tokens, position embeddings) and of every bias adds up to the target logit, except what the
    softmax rule gives to the bias of its Taylor expansion; with ``attention="cp"`` nothing is lost in the
    attention, so on a model without biases and position embeddings the patch relevances sum exactly to the
    target logit. A score function as the target starts the backward pass from its gradient with respect to
    the logits (relevance = its first-order Taylor terms). The first call checks that the recomputed
    forward pass reproduces the model's logits on one image.

    Args:
        attention: ``"attnlrp"`` (the paper's softmax and uniform rules) or ``"cp"`` (attention weights held
            constant: CP-LRP, LXT's default for torchvision's ViT).
    """

    name = "attnlrp"
    paper = "Achtibat et al., AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers, ICML 2024"
    cost = "1 forward + 1 backward (modified gradients, explicit attention)"
    scale = "signed"
    needs_global_attention = True
    meaning = "the LRP relevance of each patch for the target (AttnLRP rules, as LXT computes them)"

    def __init__(self, model, *, attention: str = "attnlrp"):
        super().__init__(model)
        if attention not in ("attnlrp", "cp"):
            raise VitlensError(f"attnlrp: attention must be 'attnlrp' or 'cp', got {attention!r}")
        self.attention = attention

    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        try:
            verify_once(self.backbone, "attnlrp-parts", lambda: self._check(images[:1]))
            with torch.enable_grad():
                embeddings, logits, grid = attnlrp_pass(self.backbone, images, self.attention == "cp")
                score = target.fixed(logits).score(logits).sum()
                (grad,) = torch.autograd.grad(score, embeddings)
        except UnsupportedParts as e:
            raise _refuse(e.what) from None
        return to_grid((embeddings * grad).sum(-1).detach(), grid), logits.detach()

    def _check(self, image: Tensor) -> None:
        """The recomputed forward pass reproduces the model's logits (float32, also under autocast)."""
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
            theirs = self.backbone(image)
            ours = attnlrp_pass(self.backbone, image)[1]
        if (ours - theirs).abs().max() > 1e-3 * theirs.abs().max() + 1e-5:
            raise _refuse("this model: recomputing it from its parts does not reproduce its logits")
