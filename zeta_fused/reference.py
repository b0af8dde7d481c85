"""Eager PyTorch reference of the patch embedding: the fallback path and the test oracle.

    P = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)")   # (B, N, K)
    A = LayerNorm_K(P)           (optional)
    Z = A @ W.T + bias           (bias optional)
    Y = LayerNorm_D(Z)           (optional)                        # (B, N, D)

This is vit-pytorch's ``to_patch_embedding``. The flatten order is (p1 p2 c), so a Conv2d weight
(D, C, ph, pw) corresponds to ``weight.permute(0, 2, 3, 1).reshape(D, K)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

PATCHIFY = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"

Norm = tuple[Tensor, Tensor] | None


def patchify(x: Tensor, ph: int, pw: int) -> Tensor:
    """(B, C, H, W) -> (B, N, K) with k = (i * pw + j) * C + c."""
    return rearrange(x, PATCHIFY, p1=ph, p2=pw)


def patch_embed_reference(
    x: Tensor,
    patch_size: tuple[int, int],
    weight: Tensor,
    bias: Tensor | None = None,
    pre_norm: Norm = None,
    post_norm: Norm = None,
    eps: float = 1e-5,
) -> Tensor:
    """The patch embedding in plain PyTorch ops (same dtypes rules as the eager module)."""
    a = patchify(x, *patch_size)
    if pre_norm is not None:
        a = F.layer_norm(a, a.shape[-1:], pre_norm[0], pre_norm[1], eps)
    z = F.linear(a, weight_matrix(weight), bias)
    if post_norm is not None:
        z = F.layer_norm(z, z.shape[-1:], post_norm[0], post_norm[1], eps)
    return z


def weight_matrix(weight: Tensor) -> Tensor:
    """The projection as (D, K) in (p1 p2 c) order; a Conv2d weight (D, C, ph, pw) is permuted."""
    return weight.permute(0, 2, 3, 1).flatten(1) if weight.ndim == 4 else weight


def unpatchify(p: Tensor, ph: int, pw: int, hp: int, wp: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, K) -> (B, C, hp * ph, wp * pw)."""
    return rearrange(p, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=hp, w=wp, p1=ph, p2=pw)


def layer_norm_backward(dy: Tensor, xhat: Tensor, rstd: Tensor, gamma: Tensor | None) -> Tensor:
    """Input gradient of a LayerNorm over the last dim, given the normalised input ``xhat``."""
    g = dy if gamma is None else dy * gamma
    mean_g = g.mean(-1, keepdim=True)
    mean_gx = (g * xhat).mean(-1, keepdim=True)
    return rstd * (g - mean_g - xhat * mean_gx)


def row_stats(t: Tensor, eps: float, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Mean and 1/std over the last dim in ``dtype`` (two-pass, as the kernels compute them)."""
    t = t.to(dtype)
    mean = t.mean(-1, keepdim=True)
    var = (t - mean).square().mean(-1, keepdim=True)
    return mean, torch.rsqrt(var + eps)


# --- The op's eager implementation (CPU without the interpreter), with the saved statistics ----


def stats_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: fp32, or fp64 when computing in fp64."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def absent_grad(like: Tensor) -> Tensor:
    """Placeholder for a gradient nobody needs (a new one each time: outputs may not alias)."""
    return like.new_empty(0)


def _normalise(t: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    return (t - mean) * rstd


def forward_with_stats(x, weight, bias, g1, b1, g2, b2, ph, pw, eps, compute_dtype, out_dtype):
    """What the fused kernel computes, in eager ops: LayerNorm statistics and the GEMM
    accumulation in fp32 (fp64 for fp64), GEMM operands rounded to ``compute_dtype``.
    Returns ``(y, stats)`` with stats = (mean1, rstd1, mean2, rstd2) per token, shape (4, B*N)."""
    acc = stats_dtype(compute_dtype)
    p = patchify(x, ph, pw).to(acc)
    ones = p.new_ones(p.shape[:-1] + (1,))
    mean1, rstd1 = (ones - 1, ones) if g1 is None else row_stats(p, eps, acc)
    a = p if g1 is None else _normalise(p, mean1, rstd1) * g1 + b1
    z = a.to(compute_dtype).to(acc) @ weight_matrix(weight).to(compute_dtype).to(acc).T
    if bias is not None:
        z = z + bias
    mean2, rstd2 = (ones - 1, ones) if g2 is None else row_stats(z, eps, acc)
    y = z if g2 is None else _normalise(z, mean2, rstd2) * g2 + b2
    stats = torch.stack([mean1, rstd1, mean2, rstd2]).reshape(4, -1)
    return y.to(out_dtype), stats


def backward_from_stats(
    grad_y, x, weight, bias, g1, b1, g2, stats, ph, pw, compute_dtype, needs_x_grad
):
    """All seven gradients from the saved statistics (Z is recomputed). Gradients nobody needs
    (no bias, no norm, image without grad) come back as empty tensors."""
    acc = stats.dtype
    batch, _, height, width = x.shape
    hp, wp = height // ph, width // pw
    mean1, rstd1, mean2, rstd2 = stats.reshape(4, batch, hp * wp, 1)
    p = patchify(x, ph, pw).to(acc)
    xhat = _normalise(p, mean1, rstd1)
    a = p if g1 is None else xhat * g1 + b1
    a = a.to(compute_dtype).to(acc)
    w = weight_matrix(weight).to(compute_dtype).to(acc)
    z = a @ w.T
    if bias is not None:
        z = z + bias
    dy = grad_y.to(acc)
    dg2, db2 = absent_grad(weight), absent_grad(weight)
    dz = dy
    if g2 is not None:
        zhat = _normalise(z, mean2, rstd2)
        dg2 = (dy * zhat).sum((0, 1)).to(g2.dtype)
        db2 = dy.sum((0, 1)).to(g2.dtype)
        dz = layer_norm_backward(dy, zhat, rstd2, g2)
    dw = (dz.flatten(0, 1).T @ a.flatten(0, 1)).to(weight.dtype)
    if weight.ndim == 4:  # back to the Conv2d layout (D, C, ph, pw)
        dw = dw.reshape(weight.shape[0], ph, pw, -1).permute(0, 3, 1, 2).contiguous()
    dbias = absent_grad(weight) if bias is None else dz.sum((0, 1)).to(bias.dtype)
    dg1, db1, dx = absent_grad(weight), absent_grad(weight), absent_grad(weight)
    if g1 is not None or needs_x_grad:
        da = dz @ w
        if g1 is not None:
            dg1 = (da * xhat).sum((0, 1)).to(g1.dtype)
            db1 = da.sum((0, 1)).to(b1.dtype)
            da = layer_norm_backward(da, xhat, rstd1, g1)
        if needs_x_grad:
            # A fresh tensor: without norms da is grad_y itself, and outputs may not alias inputs.
            dx = unpatchify(da, ph, pw, hp, wp).to(x.dtype, copy=True)
    return dx, dw, dbias, dg1, db1, dg2, db2
