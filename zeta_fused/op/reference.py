"""Eager PyTorch reference of the patch embedding: the fallback path and the test oracle.

    P = patchify(x)              # (B, N, K), k in (*patch, c) order: vit-pytorch's (p1 p2 c)
    A = LayerNorm_K(P)           (optional; affine weight and bias each optional)
    Z = A @ W.T + bias           (bias optional)
    T = LayerNorm_D(Z) + pos     (both optional)                   # (B, N, D)
    R = concat(prefix, T)        (prefix (P, D) optional: the same rows for every image)
    Y = LayerNorm_stem(R)        (optional: over D, every row)     # (B, P + N, D)

For images this is vit-pytorch's ``to_patch_embedding``. A conv weight (D, C, *patch) is the
same projection with K in (c, *patch) order: ``weight_matrix`` permutes it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.contract import NO_NORM, STAT_ROWS
from .args import BwdArgs, FwdArgs, Grads, fwd_of

# vit-pytorch's image patch layout, as its Rearrange layer writes it.
PATCHIFY = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"

# A LayerNorm's (weight, bias), either of them None; None: no norm.
Norm = tuple[Tensor | None, Tensor | None] | None


class Stem(NamedTuple):
    """What a whole ViT stem adds after the patch embedding (see ``patch_embed``)."""

    pos: Tensor | None  # (N, D) position table of the patch tokens
    prefix: Tensor | None  # (P, D) rows before every image's patch tokens
    norm: Norm  # the LayerNorm over D of every output row
    eps: float


NO_STEM = Stem(None, None, None, 1e-5)


def _grid(x: Tensor, patch) -> list[int]:
    return [s // p for s, p in zip(x.shape[2:], patch, strict=True)]


def patchify(x: Tensor, patch) -> Tensor:
    """(B, C, *spatial) -> (B, N, K): tokens in grid order, K in (*patch, c) order."""
    batch, chans, grid = x.shape[0], x.shape[1], _grid(x, patch)
    split = [batch, chans] + [n for g, p in zip(grid, patch, strict=True) for n in (g, p)]
    nd = len(grid)
    order = [0, *range(2, 2 + 2 * nd, 2), *range(3, 3 + 2 * nd, 2), 1]
    return x.reshape(split).permute(order).reshape(batch, math.prod(grid), chans * math.prod(patch))


def unpatchify(p: Tensor, patch, spatial) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, K) -> (B, C, *spatial)."""
    grid = [s // q for s, q in zip(spatial, patch, strict=True)]
    nd = len(grid)
    batch, chans = p.shape[0], p.shape[-1] // math.prod(patch)
    p = p.reshape(batch, *grid, *patch, chans)
    order = [0, 2 * nd + 1] + [i for d in range(nd) for i in (1 + d, 1 + nd + d)]
    return p.permute(order).reshape(batch, chans, *spatial)


def weight_matrix(weight: Tensor) -> Tensor:
    """The projection as (D, K) in (*patch, c) order; a conv weight (D, C, *patch) is permuted."""
    if weight.ndim == 2:
        return weight
    return weight.permute(0, *range(2, weight.ndim), 1).flatten(1)


def layer_norm(t: Tensor, norm: Norm, eps: float) -> Tensor:
    return t if norm is None else F.layer_norm(t, t.shape[-1:], norm[0], norm[1], eps)


def patch_embed_reference(
    x: Tensor,
    patch_size,
    weight: Tensor,
    bias: Tensor | None = None,
    pre_norm: Norm = None,
    post_norm: Norm = None,
    eps: float = 1e-5,
    stem: Stem = NO_STEM,
) -> Tensor:
    """The patch embedding in plain PyTorch ops (same dtype rules as the eager module)."""
    a = layer_norm(patchify(x, patch_size), pre_norm, eps)
    y = layer_norm(F.linear(a, weight_matrix(weight), bias), post_norm, eps)
    if stem is NO_STEM:
        return y
    if stem.pos is not None:
        y = y + stem.pos
    if stem.prefix is not None:
        y = torch.cat([stem.prefix.expand(y.shape[0], -1, -1), y], 1)
    return layer_norm(y, stem.norm, stem.eps)


def reference_call(a: FwdArgs) -> Tensor:
    """The eager path of a call of the op (what ``backend="eager"`` runs): its inputs through
    :func:`patch_embed_reference`, differentiable by autograd."""

    def norm(kind: str, weight: Tensor | None, bias: Tensor | None) -> Norm:
        return None if kind == NO_NORM else (weight, bias)

    stem = NO_STEM
    if a.pos is not None or a.prefix is not None or a.stem_norm != NO_NORM:
        stem = Stem(a.pos, a.prefix, norm(a.stem_norm, a.g3, a.b3), a.stem_eps)
    return patch_embed_reference(a.x, a.patch, a.weight, a.bias, norm(a.pre_norm, a.g1, a.b1),
                                 norm(a.post_norm, a.g2, a.b2), a.eps, stem)  # fmt: skip


# --- The op's eager implementation (CPU without the interpreter), with the saved statistics ----


def stats_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: fp32, or fp64 when computing in fp64."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def absent_grad(like: Tensor) -> Tensor:
    """Placeholder for a gradient nobody needs (a new one each time: outputs may not alias)."""
    return like.new_empty(0)


def row_stats(t: Tensor, eps: float, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Mean and 1/std over the last dim in ``dtype`` (two-pass, as the kernels compute them)."""
    t = t.to(dtype)
    mean = t.mean(-1, keepdim=True)
    var = (t - mean).square().mean(-1, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _affine(t_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    t = t_hat if weight is None else t_hat * weight
    return t if bias is None else t + bias


def _normed(t: Tensor, kind: str, weight, bias, eps: float, acc: torch.dtype):
    """(normalised and affine t, t_hat, mean, rstd); no norm: t itself, mean 0, rstd 1."""
    if kind == NO_NORM:
        ones = t.new_ones(t.shape[:-1] + (1,))
        return t, t, ones - 1, ones
    mean, rstd = row_stats(t, eps, acc)
    t_hat = (t - mean) * rstd
    return _affine(t_hat, weight, bias), t_hat, mean, rstd


def _projection(a: FwdArgs):
    """(A rounded to the GEMM dtype, x̂, mean1, rstd1, W rounded) in the accumulation dtype."""
    acc = stats_dtype(a.compute_dtype)
    p = patchify(a.x, a.patch).to(acc)
    act, x_hat, mean1, rstd1 = _normed(p, a.pre_norm, a.g1, a.b1, a.eps, acc)
    w = weight_matrix(a.weight).to(a.compute_dtype).to(acc)
    return act.to(a.compute_dtype).to(acc), x_hat, mean1, rstd1, w


def forward_with_stats(a: FwdArgs) -> tuple[Tensor, Tensor]:
    """What the fused kernel computes, in eager ops: LayerNorm statistics and the GEMM
    accumulation in fp32 (fp64 for fp64), GEMM operands rounded to ``compute_dtype``.
    Returns ``(y, stats)``, stats = the STAT_ROWS of every patch token, (len(STAT_ROWS), B*N)."""
    act, _, mean1, rstd1, w = _projection(a)
    z = act @ w.T if a.bias is None else act @ w.T + a.bias
    t, _, mean2, rstd2 = _normed(z, a.post_norm, a.g2, a.b2, a.eps, z.dtype)
    if a.pos is not None:
        t = t + a.pos.to(t.dtype)
    y, _, mean3, rstd3 = _normed(t, a.stem_norm, a.g3, a.b3, a.stem_eps, t.dtype)
    stats = torch.stack([mean1, rstd1, mean2, rstd2, mean3, rstd3]).reshape(len(STAT_ROWS), -1)
    if a.prefix is not None:
        y = torch.cat([prefix_rows(a, t.dtype).expand(y.shape[0], -1, -1), y], 1)
    return y.to(a.out_dtype), stats


def prefix_rows(a: FwdArgs, acc: torch.dtype) -> Tensor:
    """The P output rows every image starts with: the stem norm of the prefix, in ``acc``."""
    return _normed(a.prefix.to(acc), a.stem_norm, a.g3, a.b3, a.stem_eps, acc)[0]


def prefix_grads(a: FwdArgs, grad_rows: Tensor, acc: torch.dtype) -> tuple[Tensor, ...]:
    """Gradients from the prefix rows' upstream gradient (B, P, D): (prefix, g3 part, b3 part),
    the last two None without their parameter. The rows are the same in every image, so the
    batch is summed first (the stem-norm backward is linear in its upstream gradient)."""
    dy = grad_rows.to(acc).sum(0)
    if a.stem_norm == NO_NORM:
        return dy, None, None
    _, p_hat, _, rstd = _normed(a.prefix.to(acc), a.stem_norm, a.g3, a.b3, a.stem_eps, acc)
    dg3 = None if a.g3 is None else (dy * p_hat).sum(0)
    db3 = None if a.b3 is None else dy.sum(0)
    return layer_norm_backward(dy, p_hat, rstd, a.g3), dg3, db3


def layer_norm_backward(dy: Tensor, t_hat: Tensor, rstd: Tensor, gamma: Tensor | None) -> Tensor:
    """Input gradient of a LayerNorm over the last dim, given the normalised input ``t_hat``."""
    g = dy if gamma is None else dy * gamma
    mean_g = g.mean(-1, keepdim=True)
    mean_gx = (g * t_hat).mean(-1, keepdim=True)
    return rstd * (g - mean_g - t_hat * mean_gx)


def _norm_param_grads(dy: Tensor, t_hat: Tensor, weight, bias,
                      extra: tuple = (None, None)) -> tuple[Tensor | None, ...]:  # fmt: skip
    """(dweight, dbias) of a norm, plus ``extra`` parts (the prefix rows' of the stem norm)
    added before the one rounding to the parameters' dtype."""
    reduce = tuple(range(dy.ndim - 1))
    out = []
    for param, grad, more in ((weight, dy * t_hat, extra[0]), (bias, dy, extra[1])):
        if param is None:
            out.append(None)
            continue
        total = grad.sum(reduce)
        out.append((total if more is None else total + more).to(param.dtype))
    return tuple(out)


def backward_from_stats(args: BwdArgs) -> Grads:
    """Every gradient from the saved statistics (Z is recomputed). Gradients nobody needs (an
    absent parameter, an image without grad) come back as empty tensors."""
    a = fwd_of(args)
    acc = args.stats.dtype
    mean1, rstd1, mean2, rstd2, mean3, rstd3 = args.stats.reshape(
        len(STAT_ROWS), a.x.shape[0], -1, 1
    )
    p = patchify(a.x, a.patch).to(acc)
    x_hat = (p - mean1) * rstd1
    act = p if a.pre_norm == NO_NORM else _affine(x_hat, a.g1, a.b1)
    act = act.to(a.compute_dtype).to(acc)
    w = weight_matrix(a.weight).to(a.compute_dtype).to(acc)
    z = act @ w.T if a.bias is None else act @ w.T + a.bias
    z_hat = (z - mean2) * rstd2
    grads = dict.fromkeys(Grads._fields)
    n_prefix = 0 if a.prefix is None else a.prefix.shape[0]
    dz = args.grad_y[:, n_prefix:].to(acc)
    prefix_parts = (None, None)  # the prefix rows' parts of dg3, db3
    if a.prefix is not None:
        dprefix, *prefix_parts = prefix_grads(a, args.grad_y[:, :n_prefix], acc)
        grads["prefix"] = dprefix.to(a.prefix.dtype)
    if a.stem_norm != NO_NORM:
        t = z if a.post_norm == NO_NORM else _affine(z_hat, a.g2, a.b2)
        t = t if a.pos is None else t + a.pos.to(acc)
        t_hat = (t - mean3) * rstd3
        grads["g3"], grads["b3"] = _norm_param_grads(dz, t_hat, a.g3, a.b3, prefix_parts)
        dz = layer_norm_backward(dz, t_hat, rstd3, a.g3)
    if a.pos is not None:
        grads["pos"] = dz.sum(0).to(a.pos.dtype)
    if a.post_norm != NO_NORM:
        grads["g2"], grads["b2"] = _norm_param_grads(dz, z_hat, a.g2, a.b2)
        dz = layer_norm_backward(dz, z_hat, rstd2, a.g2)
    dw = (dz.flatten(0, 1).T @ act.flatten(0, 1)).to(a.weight.dtype)
    if a.weight.ndim > 2:  # back to the conv layout (D, C, *patch)
        dw = dw.reshape(a.weight.shape[0], *a.patch, -1)
        dw = dw.permute(0, dw.ndim - 1, *range(1, dw.ndim - 1)).contiguous()
    grads["weight"] = dw
    grads["bias"] = None if a.bias is None else dz.sum((0, 1)).to(a.bias.dtype)
    if a.pre_norm != NO_NORM or args.needs_x_grad:
        da = dz @ w
        if a.pre_norm != NO_NORM:
            grads["g1"], grads["b1"] = _norm_param_grads(da, x_hat, a.g1, a.b1)
            da = layer_norm_backward(da, x_hat, rstd1, a.g1)
        if args.needs_x_grad:
            # A fresh tensor: without norms da is grad_y itself, and outputs may not alias inputs.
            grads["x"] = unpatchify(da, a.patch, a.x.shape[2:]).to(a.x.dtype, copy=True)
    return Grads(**{n: absent_grad(a.weight) if g is None else g for n, g in grads.items()})
