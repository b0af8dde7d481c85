"""The prefix rows (class, distillation and register tokens): P rows (P, D), the same in every
image, put before its patch tokens through the stem norm. Pure @triton.jit functions, no
launches: the forward kernel's programs after the tokens' write them (:func:`prefix_rows`),
one program of the dZ kernel makes their gradients (:func:`prefix_grads`). Output and
upstream-gradient pointers point at image 0's first patch token, so prefix row p of image b
lies at b * sb + (p - P) * sn from them.
"""

import triton
import triton.language as tl

from .gather import READ_BACK
from .norms import (
    NO_NORM,
    norm_apply,
    norm_bwd,
    norm_bwd_sums,
    norm_merge,
    normalize,
    rstd_of,
    scale_cols,
)
from .rounding import cast


@triton.jit
def _row_stats(rows, p_mask, D, NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """(mean, m2) of the stem norm over the prefix rows (zeros without one)."""
    zeros = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    mean3, m3 = zeros, zeros
    if NORM3 != NO_NORM:
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            t = tl.load(rows + offs_n[None, :], mask=p_mask[:, None] & n_mask[None, :],
                        other=0.0).to(ACC_DTYPE)  # fmt: skip
            mean3, m3 = norm_merge(mean3, m3, t, n_mask, n0, tl.minimum(D - n0, BLOCK_N), NORM3)
    return mean3, m3


@triton.jit
def prefix_rows(p0, Prefix, P, Y, y_strides, B, D, norm3, eps3, NORM3: tl.constexpr,
                ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    """The prefix rows p0 .. p0 + BLOCK_P of every image: the stem norm of the contiguous
    (P, D) Prefix (the rows as they are without one), stored before each image's tokens."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    rows = Prefix + offs_p.to(tl.int64)[:, None] * D
    mean3, m3 = _row_stats(rows, p_mask, D, NORM3, ACC_DTYPE, BLOCK_P, BLOCK_N)
    rstd3 = rstd_of(m3, D, eps3, NORM3)
    y_rows = Y + (offs_p - P).to(tl.int64) * y_strides[1]
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D
        mask = p_mask[:, None] & n_mask[None, :]
        t = tl.load(rows + offs_n[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        y = cast(norm_apply(t, mean3, rstd3, norm3, offs_n, n_mask, NORM3, ACC_DTYPE),
                 Y.dtype.element_ty, EMULATE_BF16)  # fmt: skip
        out = y_rows[:, None] + offs_n[None, :]
        for _b in range(0, B):  # (pointer steps: no 32-bit product of b and the image stride)
            tl.store(out, y, mask=mask)
            out += y_strides[0]


@triton.jit
def prefix_grads(Prefix, P, DY, dy_strides, B, D, norm3, eps3, DPrefix, DYSum, parts3,
                 NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The prefix rows' gradients (P <= BLOCK_P), one program. Their upstream gradient summed
    over the images in order (into DYSum, (P, D) ACC_DTYPE: the rows are the same in every
    image, and the stem norm's backward is linear in it); DPrefix (P, D) is that sum without a
    stem norm, else its backward rstd * (g - mean(g) - p̂ mean(g p̂)) with g = dy * weight.
    parts3 = (dG3, dB3), each (D,) ACC_DTYPE or None: Σ_p dy * p̂ and Σ_p dy, the prefix rows'
    parts of the stem norm's parameter gradients (the dW kernel's column programs add them)."""
    g3, _b3 = norm3
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    rows = Prefix + offs_p.to(tl.int64)[:, None] * D
    dy_rows = DY + (offs_p - P).to(tl.int64)[:, None] * dy_strides[1]
    out_rows = DPrefix + offs_p.to(tl.int64)[:, None] * D
    sum_rows = out_rows  # (DYSum is None without a stem norm: the sum is the gradient)
    if NORM3 != NO_NORM:
        sum_rows = DYSum + offs_p.to(tl.int64)[:, None] * D
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = p_mask[:, None] & (offs_n < D)[None, :]
        ptrs = dy_rows + offs_n[None, :] * dy_strides[2]
        dy = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC_DTYPE)
        for _b in range(0, B):  # (pointer steps: no 32-bit product of b and the image stride)
            dy += tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            ptrs += dy_strides[0]
        if NORM3 == NO_NORM:
            tl.store(out_rows + offs_n[None, :], cast(dy, DPrefix.dtype.element_ty, EMULATE_BF16),
                     mask=mask)  # fmt: skip
        else:
            tl.store(sum_rows + offs_n[None, :], dy, mask=mask)
    if NORM3 != NO_NORM:
        mean3, m3 = _row_stats(rows, p_mask, D, NORM3, ACC_DTYPE, BLOCK_P, BLOCK_N)
        rstd3 = rstd_of(m3, D, eps3, NORM3)
        zeros = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
        sum_g, sum_gt = zeros, zeros
        tl.debug_barrier()  # (the sums stored above are read back below)
        for n0 in range(0, D, BLOCK_N):
            offs_n, n_mask, mask, dy, t_hat, g = _grad_chunk(n0, p_mask, rows, sum_rows, g3,
                                                             mean3, rstd3, D, NORM3, ACC_DTYPE,
                                                             BLOCK_N)  # fmt: skip
            sum_g, sum_gt = norm_bwd_sums(sum_g, sum_gt, g, t_hat)
            if parts3[0] is not None:
                tl.store(parts3[0] + offs_n, tl.sum(dy * t_hat, axis=0), mask=n_mask)
            if parts3[1] is not None:
                tl.store(parts3[1] + offs_n, tl.sum(dy, axis=0), mask=n_mask)
        mean_g, mean_gt = sum_g / D, sum_gt / D
        for n0 in range(0, D, BLOCK_N):
            offs_n, n_mask, mask, dy, t_hat, g = _grad_chunk(n0, p_mask, rows, sum_rows, g3,
                                                             mean3, rstd3, D, NORM3, ACC_DTYPE,
                                                             BLOCK_N)  # fmt: skip
            dp = norm_bwd(g, t_hat, rstd3, mean_g, mean_gt, NORM3)
            tl.store(out_rows + offs_n[None, :], cast(dp, DPrefix.dtype.element_ty, EMULATE_BF16),
                     mask=mask)  # fmt: skip


@triton.jit
def _grad_chunk(n0, p_mask, rows, sum_rows, g3, mean3, rstd3, D, NORM3: tl.constexpr,
                ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Columns n0 .. n0 + BLOCK_N of the prefix rows' backward: (offsets, their mask, the
    tile's mask, the batch-summed dy read back, p̂ (0 outside the rows), g = dy * weight)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    mask = p_mask[:, None] & n_mask[None, :]
    dy = tl.load(sum_rows + offs_n[None, :], mask=mask, other=0.0, cache_modifier=READ_BACK)
    t = tl.load(rows + offs_n[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    t_hat = tl.where(mask, normalize(t, mean3, rstd3, NORM3), 0.0)
    return offs_n, n_mask, mask, dy, t_hat, scale_cols(dy, g3, offs_n, n_mask, ACC_DTYPE)
