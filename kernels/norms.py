"""Norm math shared by every kernel (docs/design.md, "Norms"): the normalisation, its affine
part, the merge of partial row statistics, the norm backward, and the layout of the row
statistics the forward saves for the backward. Pure @triton.jit functions, no launches.

A norm is a kind (the NORM constexprs, the op's strings: NO_NORM, LAYER_NORM, RMS_NORM) and a
``(weight, bias)`` tuple of pointers, either of them None (``nn.LayerNorm(bias=False)``,
``elementwise_affine=False``, an RMSNorm's absent bias). Every helper that differs between
kinds takes the kind; kernels test only "a norm or none" (``NORM != NO_NORM``).
"""

import triton
import triton.language as tl

from . import contract
from .contract import STAT_ROWS

NO_NORM = tl.constexpr(contract.NO_NORM)
LAYER_NORM = tl.constexpr(contract.LAYER_NORM)
RMS_NORM = tl.constexpr(contract.RMS_NORM)

# Rows of the statistics buffer (STAT_ROWS, M), one value per token each; a norm that is off
# stores mean 0 and rstd 1, an RMSNorm mean 0.
MEAN1 = tl.constexpr(STAT_ROWS.index("mean1"))
RSTD1 = tl.constexpr(STAT_ROWS.index("rstd1"))
MEAN2 = tl.constexpr(STAT_ROWS.index("mean2"))
RSTD2 = tl.constexpr(STAT_ROWS.index("rstd2"))
MEAN3 = tl.constexpr(STAT_ROWS.index("mean3"))
RSTD3 = tl.constexpr(STAT_ROWS.index("rstd3"))


@triton.jit
def normalize(t, mean, rstd, NORM: tl.constexpr):
    """t̂ per row of a [rows, cols] tile, the one line every norm shares: (t - mean) * rstd; an
    RMSNorm does not centre."""
    if NORM == LAYER_NORM:
        t = t - mean[:, None]
    return t * rstd[:, None]


@triton.jit
def scale_cols(t, Weight, offs, mask, ACC_DTYPE: tl.constexpr):
    """t * weight[offs] along the columns; t itself when the weight is None."""
    if Weight is not None:
        t = t * tl.load(Weight + offs, mask=mask, other=0.0).to(ACC_DTYPE)[None, :]
    return t


@triton.jit
def affine(t_hat, params, offs, mask, ACC_DTYPE: tl.constexpr):
    """t̂ * weight + bias along the columns offs, params = (weight, bias), either None."""
    t = scale_cols(t_hat, params[0], offs, mask, ACC_DTYPE)
    if params[1] is not None:
        t += tl.load(params[1] + offs, mask=mask, other=0.0).to(ACC_DTYPE)[None, :]
    return t


@triton.jit
def norm_apply(t, mean, rstd, params, offs, mask, NORM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The norm of kind NORM over the columns offs of a tile, with its (weight, bias) params
    (either None); NO_NORM gives t back."""
    if NORM != NO_NORM:
        t = affine(normalize(t, mean, rstd, NORM), params, offs, mask, ACC_DTYPE)
    return t


@triton.jit
def rstd_of(m2, n, eps, NORM: tl.constexpr):
    """1 / std from a row's sum of squared deviations over n elements (squares for an
    RMSNorm, whose mean is 0); 1 for no norm, whose eps is not one."""
    rstd = tl.full(m2.shape, 1.0, m2.dtype)
    if NORM != NO_NORM:
        rstd = 1.0 / tl.sqrt(m2 / n + eps)
    return rstd


@triton.jit
def norm_merge(mean, m2, chunk, n_mask, n_seen, n_valid, NORM: tl.constexpr):
    """Row statistics of n_seen columns merged with those of a chunk of n_valid more (the
    columns n_mask marks): a LayerNorm's mean and sum of squared deviations, the chunk's taken
    about its own mean and merged as Chan et al. do (:func:`stats_combine`), which keeps the
    variance accurate when |mean| >> std; an RMSNorm's sum of squares (its mean stays 0)."""
    if NORM == LAYER_NORM:
        # Counts in the statistics' dtype: fp32 ratios such as 32 / 96 would cost fp64 its
        # digits.
        count = n_valid * tl.full([], 1.0, mean.dtype)
        chunk_mean = tl.sum(tl.where(n_mask[None, :], chunk, 0.0), axis=1) / count
        centred = tl.where(n_mask[None, :], chunk - chunk_mean[:, None], 0.0)
        mean, m2 = stats_combine(mean, m2, n_seen, chunk_mean, tl.sum(centred * centred, axis=1),
                                 n_valid, NORM)  # fmt: skip
    else:
        m2 += tl.sum(tl.where(n_mask[None, :], chunk * chunk, 0.0), axis=1)
    return mean, m2


@triton.jit
def stats_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b, NORM: tl.constexpr):
    """Row statistics of two disjoint column sets of n_a and n_b > 0 columns, merged (a
    LayerNorm's: Chan et al.; an RMSNorm's sums of squares add)."""
    m2 = m2_a + m2_b
    mean = mean_a
    if NORM == LAYER_NORM:
        one = tl.full([], 1.0, mean_a.dtype)
        count_a = n_a * one
        count_b = n_b * one
        total = count_a + count_b
        delta = mean_b - mean_a
        mean = mean_a + delta * (count_b / total)
        m2 += delta * delta * (count_a * count_b / total)
    return mean, m2


@triton.jit
def norm_bwd_sums(sum_g, sum_gt, g, t_hat):
    """The two row reductions a norm's backward needs, sums of g and g * t̂ (g = upstream
    gradient times the norm's weight), accumulated over one more column chunk (an RMSNorm
    needs only the second; the first is then unused and compiled away)."""
    sum_g += tl.sum(g, axis=1)
    sum_gt += tl.sum(g * t_hat, axis=1)
    return sum_g, sum_gt


@triton.jit
def norm_bwd(g, t_hat, rstd, mean_g, mean_gt, NORM: tl.constexpr):
    """Input gradient of a norm: rstd * (g - mean(g) - t̂ * mean(g * t̂)); an RMSNorm, which
    does not centre, has no mean(g) term."""
    if NORM == LAYER_NORM:
        g = g - mean_g[:, None]
    return rstd[:, None] * (g - t_hat * mean_gt[:, None])


@triton.jit
def load_stat(Stats, ROW: tl.constexpr, offs_m, m_mask, M):
    """One row (MEAN1 ... RSTD3) of the statistics buffer for tokens offs_m."""
    return tl.load(Stats + ROW * M + offs_m, mask=m_mask, other=0.0)


@triton.jit
def store_row_norm_stats(Stats, offs_m, m_mask, M, mean2, rstd2, mean3, rstd3):
    """The rows of the statistics buffer that the norms over D fill."""
    tl.store(Stats + MEAN2 * M + offs_m, mean2, mask=m_mask)
    tl.store(Stats + RSTD2 * M + offs_m, rstd2, mask=m_mask)
    tl.store(Stats + MEAN3 * M + offs_m, mean3, mask=m_mask)
    tl.store(Stats + RSTD3 * M + offs_m, rstd3, mask=m_mask)


@triton.jit
def store_stats(Stats, offs_m, m_mask, M, mean1, rstd1, mean2, rstd2, mean3, rstd3):
    tl.store(Stats + MEAN1 * M + offs_m, mean1, mask=m_mask)
    tl.store(Stats + RSTD1 * M + offs_m, rstd1, mask=m_mask)
    store_row_norm_stats(Stats, offs_m, m_mask, M, mean2, rstd2, mean3, rstd3)
