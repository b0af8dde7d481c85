"""Eager PyTorch reference of the patch embedding: the fallback path and the test oracle.

    P = patchify(x)              # (B, N, K), k in (*patch, c) order: vit-pytorch's (p1 p2 c)
    P = P[:, keep]               (keep (B, L) optional: the patches each image embeds; pos too)
    A = norm1(P)                 (optional; a LayerNorm or RMSNorm over K, affine parts optional)
    Z = A @ W.T + bias           (bias optional)
    T = norm2(Z) + pos           (both optional)                   # (B, N, D)
    R = concat(prefix, T)        (prefix (P, D) optional: the same rows for every image)
    Y = norm3(R)                 (optional: over D, every row)     # (B, P + N, D)

For images this is vit-pytorch's ``to_patch_embedding``. A conv weight (D, C, *patch) is the
same projection with K in (c, *patch) order: ``weight_matrix`` permutes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.contract import LAYER_NORM, NO_NORM, STAT_ROWS
from .args import NO_STEM, BwdArgs, FwdArgs, Grads, Norm, Stem, fwd_of

# vit-pytorch's image patch layout, as its Rearrange layer writes it.
PATCHIFY = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"


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


def kept(t: Tensor, keep: Tensor | None) -> Tensor:
    """The rows ``keep`` (B, L) of each image's (B, N, ...) rows, or of one (N, ...) table for
    every image: (B, L, ...); ``t`` itself without ``keep``."""
    if keep is None:
        return t
    if t.ndim == 2:
        return t[keep]
    return t.gather(1, keep.view(*keep.shape, 1).expand(-1, -1, t.shape[-1]))


def scattered(rows: Tensor, keep: Tensor | None, n: int) -> Tensor:
    """The inverse of :func:`kept` for gradients: (B, L, W) rows summed into (B, N, W), zero at
    positions not kept, repeats added."""
    if keep is None:
        return rows
    out = rows.new_zeros(rows.shape[0], n, rows.shape[-1])
    return out.scatter_add(1, keep.view(*keep.shape, 1).expand(-1, -1, rows.shape[-1]), rows)


def table_rows(pos: Tensor, keep: Tensor | None, pos_index: Tensor | None) -> Tensor:
    """The table rows added to the patch tokens: ``pos[pos_index]`` (B, rows, D), or the rows
    of their grid positions (the table itself without ``keep``)."""
    return pos[pos_index] if pos_index is not None else kept(pos, keep)


def position_sums(rows: Tensor, index: Tensor | None, n: int) -> Tensor:
    """The gradient of a table whose rows were added to ``rows`` (B, L, D): the rows summed
    over the batch into the table's n rows, by ``index`` (B, L) (None: row l of every image)."""
    if index is None:
        return rows.sum(0)
    return rows.new_zeros(n, rows.shape[-1]).index_add(0, index.flatten(), rows.flatten(0, 1))


def weight_matrix(weight: Tensor) -> Tensor:
    """The projection as (D, K) in (*patch, c) order; a conv weight (D, C, *patch) is permuted."""
    if weight.ndim == 2:
        return weight
    return weight.permute(0, *range(2, weight.ndim), 1).flatten(1)


def apply_norm(t: Tensor, norm: Norm | None) -> Tensor:
    """``norm`` over the last dimension as PyTorch's functional ops compute it (their dtypes)."""
    if norm is None:
        return t
    if norm.kind == LAYER_NORM:
        return F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, norm.eps)
    y = F.rms_norm(t, t.shape[-1:], norm.weight, norm.eps)
    return y if norm.bias is None else y + norm.bias


def patch_embed_reference(
    x: Tensor,
    patch_size,
    weight: Tensor,
    bias: Tensor | None = None,
    pre_norm: Norm | None = None,
    post_norm: Norm | None = None,
    stem: Stem = NO_STEM,
    keep: Tensor | None = None,
) -> Tensor:
    """The patch embedding in plain PyTorch ops (same dtype rules as the eager module)."""
    a = apply_norm(kept(patchify(x, patch_size), keep), pre_norm)
    y = apply_norm(F.linear(a, weight_matrix(weight), bias), post_norm)
    if stem is NO_STEM:
        return y
    if stem.pos is not None:
        y = y + table_rows(stem.pos, keep, stem.pos_index)
    if stem.prefix is not None:
        y = torch.cat([stem.prefix.expand(y.shape[0], -1, -1), y], 1)
    return apply_norm(y, stem.norm)


def reference_call(a: FwdArgs) -> Tensor:
    """The eager path of a call of the op (what ``backend="eager"`` runs): its inputs through
    :func:`patch_embed_reference`, differentiable by autograd."""
    stem = NO_STEM
    if (a.pos, a.prefix, a.pos_index) != (None, None, None) or a.stem_norm != NO_NORM:
        stem = Stem(a.pos, a.prefix, a.norm("stem"), a.pos_index)
    return patch_embed_reference(a.x, a.patch, a.weight, a.bias, a.norm("pre"), a.norm("post"),
                                 stem, a.keep)  # fmt: skip


# --- The op's eager implementation (CPU without the interpreter), with the saved statistics ----


def stats_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: fp32, or fp64 when computing in fp64."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def absent_grad(like: Tensor) -> Tensor:
    """Placeholder for a gradient nobody needs (a new one each time: outputs may not alias)."""
    return like.new_empty(0)


def row_stats(t: Tensor, norm: Norm, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Mean and 1/std over the last dim in ``dtype``, as the kernels compute them: a
    LayerNorm's two-pass mean and centred variance; an RMSNorm's mean 0 and mean square."""
    t = t.to(dtype)
    mean = t.mean(-1, keepdim=True) if norm.kind == LAYER_NORM else t.new_zeros(t.shape[:-1] + (1,))
    var = (t - mean).square().mean(-1, keepdim=True)
    return mean, torch.rsqrt(var + norm.eps)


def _affine(t_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    t = t_hat if weight is None else t_hat * weight
    return t if bias is None else t + bias


def _normed(t: Tensor, norm: Norm | None, acc: torch.dtype):
    """(normalised and affine t, t̂, mean, rstd); no norm: t itself, mean 0, rstd 1."""
    if norm is None:
        ones = t.new_ones(t.shape[:-1] + (1,))
        return t, t, ones - 1, ones
    mean, rstd = row_stats(t, norm, acc)
    t_hat = (t - mean) * rstd
    return _affine(t_hat, norm.weight, norm.bias), t_hat, mean, rstd


def _projection(a: FwdArgs):
    """(A rounded to the GEMM dtype, x̂, mean1, rstd1, W rounded) in the accumulation dtype."""
    acc = stats_dtype(a.compute_dtype)
    p = kept(patchify(a.x, a.patch), a.keep).to(acc)
    act, x_hat, mean1, rstd1 = _normed(p, a.norm("pre"), acc)
    w = weight_matrix(a.weight).to(a.compute_dtype).to(acc)
    return act.to(a.compute_dtype).to(acc), x_hat, mean1, rstd1, w


def forward_with_stats(a: FwdArgs) -> tuple[Tensor, Tensor]:
    """What the fused kernel computes, in eager ops: LayerNorm statistics and the GEMM
    accumulation in fp32 (fp64 for fp64), GEMM operands rounded to ``compute_dtype``.
    Returns ``(y, stats)``, stats = the STAT_ROWS of every patch token, (len(STAT_ROWS), B*L)."""
    act, _, mean1, rstd1, w = _projection(a)
    z = act @ w.T if a.bias is None else act @ w.T + a.bias
    t, _, mean2, rstd2 = _normed(z, a.norm("post"), z.dtype)
    if a.pos is not None:
        t = t + table_rows(a.pos, a.keep, a.pos_index).to(t.dtype)
    y, _, mean3, rstd3 = _normed(t, a.norm("stem"), t.dtype)
    stats = torch.stack([mean1, rstd1, mean2, rstd2, mean3, rstd3]).reshape(len(STAT_ROWS), -1)
    if a.prefix is not None:
        y = torch.cat([prefix_rows(a, t.dtype).expand(y.shape[0], -1, -1), y], 1)
    return y.to(a.out_dtype), stats


def prefix_rows(a: FwdArgs, acc: torch.dtype) -> Tensor:
    """The P output rows every image starts with: the stem norm of the prefix, in ``acc``."""
    return _normed(a.prefix.to(acc), a.norm("stem"), acc)[0]


def prefix_grads(a: FwdArgs, grad_rows: Tensor, acc: torch.dtype) -> tuple[Tensor, ...]:
    """Gradients from the prefix rows' upstream gradient (B, P, D): (prefix, g3 part, b3 part),
    the last two None without their parameter. The rows are the same in every image, so the
    batch is summed first (the stem-norm backward is linear in its upstream gradient)."""
    dy = grad_rows.to(acc).sum(0)
    norm = a.norm("stem")
    if norm is None:
        return dy, None, None
    _, p_hat, _, rstd = _normed(a.prefix.to(acc), norm, acc)
    dg3 = None if a.g3 is None else (dy * p_hat).sum(0)
    db3 = None if a.b3 is None else dy.sum(0)
    return norm_backward(dy, p_hat, rstd, norm), dg3, db3


def norm_backward(dy: Tensor, t_hat: Tensor, rstd: Tensor, norm: Norm) -> Tensor:
    """Input gradient of a norm over the last dim, given the normalised input ``t_hat``:
    rstd * (g - mean(g) - t̂ * mean(g * t̂)), g = dy * weight; an RMSNorm, which does not
    centre, has no mean(g) term."""
    g = dy if norm.weight is None else dy * norm.weight
    mean_gx = (g * t_hat).mean(-1, keepdim=True)
    if norm.kind == LAYER_NORM:
        g = g - g.mean(-1, keepdim=True)
    return rstd * (g - t_hat * mean_gx)


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
    pre, post, stem = a.norm("pre"), a.norm("post"), a.norm("stem")
    acc = args.stats.dtype
    n_prefix = 0 if a.prefix is None else a.prefix.shape[0]
    rows = args.grad_y.shape[1] - n_prefix  # patch tokens per image (any, with B = 0)
    mean1, rstd1, mean2, rstd2, mean3, rstd3 = args.stats.reshape(
        len(STAT_ROWS), a.x.shape[0], rows, 1
    )
    p = kept(patchify(a.x, a.patch), a.keep).to(acc)
    x_hat = (p - mean1) * rstd1
    act = p if pre is None else _affine(x_hat, a.g1, a.b1)
    act = act.to(a.compute_dtype).to(acc)
    w = weight_matrix(a.weight).to(a.compute_dtype).to(acc)
    z = act @ w.T if a.bias is None else act @ w.T + a.bias
    z_hat = (z - mean2) * rstd2
    grads = dict.fromkeys(Grads._fields)
    dz = args.grad_y[:, n_prefix:].to(acc)
    prefix_parts = (None, None)  # the prefix rows' parts of dg3, db3
    if a.prefix is not None:
        dprefix, *prefix_parts = prefix_grads(a, args.grad_y[:, :n_prefix], acc)
        grads["prefix"] = dprefix.to(a.prefix.dtype)
    if stem is not None:
        t = z if post is None else _affine(z_hat, a.g2, a.b2)
        t = t if a.pos is None else t + table_rows(a.pos, a.keep, a.pos_index).to(acc)
        t_hat = (t - mean3) * rstd3
        grads["g3"], grads["b3"] = _norm_param_grads(dz, t_hat, a.g3, a.b3, prefix_parts)
        dz = norm_backward(dz, t_hat, rstd3, stem)
    if a.pos is not None:
        index = a.keep if a.pos_index is None else a.pos_index
        grads["pos"] = position_sums(dz, index, a.pos.shape[0]).to(a.pos.dtype)
    if post is not None:
        grads["g2"], grads["b2"] = _norm_param_grads(dz, z_hat, a.g2, a.b2)
        dz = norm_backward(dz, z_hat, rstd2, post)
    dw = (dz.flatten(0, 1).T @ act.flatten(0, 1)).to(a.weight.dtype)
    if a.weight.ndim > 2:  # back to the conv layout (D, C, *patch)
        dw = dw.reshape(a.weight.shape[0], *a.patch, a.weight.shape[1])  # D or C may be 0
        dw = dw.permute(0, dw.ndim - 1, *range(1, dw.ndim - 1)).contiguous()
    grads["weight"] = dw
    grads["bias"] = None if a.bias is None else dz.sum((0, 1)).to(a.bias.dtype)
    if pre is not None or args.needs_x_grad:
        da = dz @ w
        if pre is not None:
            grads["g1"], grads["b1"] = _norm_param_grads(da, x_hat, a.g1, a.b1)
            da = norm_backward(da, x_hat, rstd1, pre)
        if args.needs_x_grad:
            # A fresh tensor: without norms da is grad_y itself, and outputs may not alias inputs.
            n = math.prod(s // q for s, q in zip(a.x.shape[2:], a.patch, strict=True))
            da = scattered(da, a.keep, n)
            grads["x"] = unpatchify(da, a.patch, a.x.shape[2:]).to(a.x.dtype, copy=True)
    return Grads(**{n: absent_grad(a.weight) if g is None else g for n, g in grads.items()})
