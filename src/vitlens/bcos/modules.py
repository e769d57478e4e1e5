"""B-cos building blocks (Böhle, Fritz, Schiele: *B-cos Networks*, CVPR 2022; *B-cos Alignment for Inherently
Interpretable CNNs and Vision Transformers*, TPAMI 2024; *Holistically Explainable Vision Transformers*, 2023).

Every unit here is written to compute exactly what the official B-cos-v2 code (PyPI ``bcos``) computes, with
the same parameter names, so that its state dicts load unchanged. Units with an input-dependent ("dynamic")
factor derive from :class:`Detachable`; inside :func:`explanation_mode` that factor is detached from the
graph, which turns the whole network into a linear map ``W(x)`` of its input whose input gradient is ``W(x)``.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.linalg as LA
import torch.nn.functional as F
from torch import Tensor, nn


class Detachable(nn.Module):
    """A module with an explanation mode, in which its dynamic factors are detached."""

    def __init__(self) -> None:
        super().__init__()
        self.explaining = False


@contextlib.contextmanager
def explanation_mode(model: nn.Module, active: bool = True) -> Iterator[nn.Module]:
    """Detach every dynamic factor of ``model`` (B-cos scales, norm deviations, attention q/k) for the body.

    The previous state of each unit is restored on exit, also on error, so explanation modes nest.
    """
    units = [m for m in model.modules() if isinstance(m, Detachable)]
    saved = [m.explaining for m in units]
    try:
        for m in units:
            m.explaining = active
        yield model
    finally:
        for m, state in zip(units, saved, strict=True):
            m.explaining = state


def encode(images: Tensor) -> Tensor:
    """The B-cos input encoding: ``[r, g, b]`` in [0, 1] → ``[r, g, b, 1-r, 1-g, 1-b]`` (channel dim 1)."""
    return torch.cat([images, 1 - images], dim=1)


def _dynamic_scale(out: Tensor, norm: Tensor, b: float, detach: bool) -> Tensor:
    """``|cos(x, ŵ)|^(B-1)`` from ``out = ŵᵀx`` and ``‖x‖``; for B = 2 exactly ``|ŵᵀx| / ‖x‖``."""
    if detach:
        out, norm = out.detach(), norm.detach()
    if b == 2:
        return out.abs() / norm
    return ((out / norm).abs() + 1e-6).pow(b - 1)


class NormedLinear(nn.Linear):
    """A linear map with unit-norm rows ``ŵ = w / ‖w‖``, renormalised every forward pass."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight / LA.vector_norm(self.weight, dim=1, keepdim=True)
        return F.linear(x, w, self.bias)


class NormedConv2d(nn.Conv2d):
    """A convolution with unit-norm filters, renormalised every forward pass."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight / LA.vector_norm(self.weight, dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class BcosLinear(Detachable):
    """The B-cos unit ``|cos(x, ŵ)|^(B-1) · ŵᵀx`` (no bias), with an optional MaxOut over ``max_out`` units.

    ``|out| = |cos|^B · ‖x‖ ≤ ‖x‖``; B = 1 is a linear layer with normalised weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, b: float = 2, max_out: int = 1):
        if bias:
            raise ValueError("B-cos units have no bias")
        if max_out < 1:
            raise ValueError(f"max_out must be at least 1, got {max_out}")
        super().__init__()
        self.in_features, self.out_features, self.b, self.max_out = in_features, out_features, b, max_out
        self.linear = NormedLinear(in_features, out_features * max_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        if self.max_out > 1:
            out = out.unflatten(-1, (self.out_features, self.max_out)).max(dim=-1).values
        if self.b == 1:
            return out
        norm = LA.vector_norm(x, dim=-1, keepdim=True) + 1e-12
        return _dynamic_scale(out, norm, self.b, self.explaining) * out

    def extra_repr(self) -> str:
        return f"B={self.b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")


class BcosConv2d(Detachable):
    """The B-cos unit as a convolution: ``‖x‖`` is the norm of each input patch (the ViT-C stem)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
        b: float = 2, max_out: int = 1,
    ):  # fmt: skip
        if max_out < 1:
            raise ValueError(f"max_out must be at least 1, got {max_out}")
        super().__init__()
        self.in_channels, self.out_channels, self.b, self.max_out = in_channels, out_channels, b, max_out
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.linear = NormedConv2d(
            in_channels, out_channels * max_out, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.patch_size = math.prod(self.linear.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_channels, self.max_out)).max(dim=2).values
        if self.b == 1:
            return out
        return _dynamic_scale(out, self.patch_norms(x), self.b, self.explaining) * out

    def patch_norms(self, x: Tensor) -> Tensor:
        """``‖x_patch‖`` at every output position ``[B, 1, H', W']`` (zero padding counted, as in B-cos-v2)."""
        squares = (x**2).sum(1, keepdim=True)
        pooled = F.avg_pool2d(squares, self.kernel_size, padding=self.padding, stride=self.stride)
        return (pooled * self.patch_size + 1e-6).sqrt_()

    def extra_repr(self) -> str:
        return f"B={self.b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")


class BcosLayerNorm(Detachable):
    """LayerNorm without bias (centred, scale kept); its standard deviation is detached when explaining."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.normalized_shape, self.eps = (dim,), eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if not self.explaining:
            return F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps)
        var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
        std = (var.detach() + self.eps).sqrt_()
        return self.weight * ((x - mean) / std)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, bias=False"


class BcosLayerNorm2d(Detachable):
    """Bias-free LayerNorm over (C, H, W) of a feature map (GroupNorm with one group), detachable std."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if not self.explaining:
            return F.group_norm(x, 1, self.weight, None, self.eps)
        g = x.reshape(x.shape[0], 1, *x.shape[1:])
        var, mean = torch.var_mean(g, dim=(2, 3, 4), unbiased=False, keepdim=True)
        g = (g - mean) / (var.detach() + self.eps).sqrt()
        return self.weight[None, :, None, None] * g.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, bias=False"


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0, device=None, dtype=None) -> Tensor:
    """The fixed 2-D sin-cos position embedding of the simple ViT (Beyer et al. 2022): ``[h·w, dim]``."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a dimension divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    omega = torch.arange(dim // 4, device=device) / (dim // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).type(dtype or torch.get_default_dtype())


class PosEmbSinCos2d(nn.Module):
    """Position embedding for patch embeddings laid out as ``[..., h, w, dim]``."""

    def __init__(self, temperature: float = 10_000.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, patches: Tensor) -> Tensor:
        h, w, dim = patches.shape[-3:]
        return sincos_2d(h, w, dim, self.temperature, patches.device, patches.dtype)


class Patchify(nn.Module):
    """``[B, C, H, W]`` → ``[B, h, w, p·p·C]`` (einops ``b c (h p1) (w p2) -> b h w (p1 p2 c)``)."""

    def __init__(self, patch_size: tuple[int, int]):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        (ph, pw), (b, c, hh, ww) = self.patch_size, x.shape
        if hh % ph or ww % pw:
            raise ValueError(f"input {hh}x{ww} is not divisible into {ph}x{pw} patches")
        x = x.reshape(b, c, hh // ph, ph, ww // pw, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, hh // ph, ww // pw, ph * pw * c)


class Attention(Detachable):
    """Pre-norm multi-head attention: bias-free q/k/v projections, plain softmax, a B-cos output projection.

    When explaining, q and k are detached, so the attention matrix is a constant and the block is linear
    in its value path. ``attend`` is the softmax module (hook it to read the probabilities).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, b: float = 2, max_out: int = 1):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = BcosLayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = BcosLinear(inner, dim, b=b, max_out=max_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        if self.explaining:
            q, k = q.detach(), k.detach()
        attn = self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale)
        out = torch.matmul(attn, v).transpose(1, 2)
        return self.to_out(out.reshape(*out.shape[:2], -1))


class FeedForward(nn.Module):
    """Pre-norm MLP: B-cos linear → no activation (the B-cos units are the non-linearity) → B-cos linear."""

    def __init__(self, dim: int, hidden_dim: int, b: float = 2, max_out: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            OrderedDict(
                norm=BcosLayerNorm(dim),
                linear1=BcosLinear(dim, hidden_dim, b=b, max_out=max_out),
                act=nn.Identity(),
                linear2=BcosLinear(hidden_dim, dim, b=b, max_out=max_out),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """One transformer block: ``x + attn(x)``, then ``x + ff(x)``."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, b: float = 2, max_out: int = 1):
        super().__init__()
        self.attn = Attention(dim, heads, dim_head, b=b, max_out=max_out)
        self.ff = FeedForward(dim, mlp_dim, b=b, max_out=max_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(x) + x
        return self.ff(x) + x


def conv_stem(in_channels: int, channels: list[int], b: float = 2, max_out: int = 1) -> nn.Sequential:
    """The ViT-C stem (Xiao et al. 2021) in B-cos form: per stage a 3×3 B-cos conv (stride 2 when the width
    grows), a bias-free 2-D LayerNorm and no activation."""
    layers: list[nn.Module] = []
    for c in channels:
        stride = 2 if c > in_channels else 1
        layers += [BcosConv2d(in_channels, c, 3, stride=stride, padding=1, b=b, max_out=max_out)]
        layers += [BcosLayerNorm2d(c), nn.Identity()]
        in_channels = c
    return nn.Sequential(*layers)
