"""Tiles of flattened patches shared by the forward and backward kernels: gather and scatter,
pre-norm statistics, and one column chunk of the projection. Pure @triton.jit functions, no
launches."""

import triton
import triton.language as tl

from .geometry import patch_cols
from .norms import LAYER_NORM, norm_apply, rstd_of
from .rounding import cast, mma

# The default cache policy of tl.load, as a constexpr object: Triton 3.6 cannot compile a call
# that leaves a plain-string constexpr default unbound.
DEFAULT_CACHE = tl.constexpr("")
# Second passes read what the same program stored in an earlier one: through L2 (".cg"), never
# a possibly stale L1 line; the tl.debug_barrier() before them orders the threads.
READ_BACK = tl.constexpr(".cg")


@triton.jit
def load_patches(X, strides, row_off, m_mask, k0, K, C: tl.constexpr, PATCH: tl.constexpr,
                 CHANNELS_FIRST: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
                 CACHE: tl.constexpr = DEFAULT_CACHE):  # fmt: skip
    """[BLOCK_M, BLOCK_K] tile of flattened patches in ACC_DTYPE, 0 outside the valid range.
    CACHE=".cg" reads through L2, for data this program wrote earlier (second passes)."""
    offs_k, k_mask, col_off = patch_cols(k0, K, C, PATCH, strides, False, CHANNELS_FIRST, BLOCK_K)
    mask = m_mask[:, None] & k_mask[None, :]
    tile = tl.load(X + row_off[:, None] + col_off[None, :], mask=mask, other=0.0,
                   cache_modifier=CACHE)  # fmt: skip
    return tile.to(ACC_DTYPE), offs_k, k_mask, mask


@triton.jit
def store_patches(DX, strides, row_off, m_mask, tile, k0, K, C: tl.constexpr,
                  PATCH: tl.constexpr, CHANNELS_FIRST: tl.constexpr, EMULATE_BF16: tl.constexpr,
                  BLOCK_K: tl.constexpr):  # fmt: skip
    """Scatter a [BLOCK_M, BLOCK_K] tile of flattened patches back into image layout."""
    _offs_k, k_mask, col_off = patch_cols(k0, K, C, PATCH, strides, False, CHANNELS_FIRST,
                                          BLOCK_K)  # fmt: skip
    mask = m_mask[:, None] & k_mask[None, :]
    out = cast(tile, DX.dtype.element_ty, EMULATE_BF16)
    tl.store(DX + row_off[:, None] + col_off[None, :], out, mask=mask)


@triton.jit
def patch_stats(X, strides, row_off, m_mask, K, C: tl.constexpr, PATCH: tl.constexpr,
                CHANNELS_FIRST: tl.constexpr, NORM: tl.constexpr, eps, ACC_DTYPE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Per-token mean and 1/std over the patch. A LayerNorm's are exact two-pass (mean, then
    centred variance): raw 0..255 pixels have |mean| >> std, where E[x^2] - E[x]^2 would
    cancel. An RMSNorm's mean is 0 and its second pass sums squares. Each pass adds whole
    tiles and reduces across the K lanes once at its end, not on every K step."""
    mean = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    if NORM == LAYER_NORM:
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC_DTYPE)
        p_next = load_patches(
            X, strides, row_off, m_mask, 0, K, C, PATCH, CHANNELS_FIRST, ACC_DTYPE, BLOCK_K
        )[0]
        for k0 in range(0, K, BLOCK_K):  # prefetching as project_chunk does
            p = p_next
            p_next = load_patches(
                X, strides, row_off, m_mask, k0 + BLOCK_K, K, C, PATCH, CHANNELS_FIRST,
                ACC_DTYPE, BLOCK_K,
            )[0]  # fmt: skip
            acc += p
        mean = tl.sum(acc, axis=1) / K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC_DTYPE)
    p_next = load_patches(
        X, strides, row_off, m_mask, 0, K, C, PATCH, CHANNELS_FIRST, ACC_DTYPE, BLOCK_K
    )[0]
    for k0 in range(0, K, BLOCK_K):
        p = p_next
        valid = (k0 + tl.arange(0, BLOCK_K) < K)[None, :] & m_mask[:, None]
        p_next = load_patches(
            X, strides, row_off, m_mask, k0 + BLOCK_K, K, C, PATCH, CHANNELS_FIRST, ACC_DTYPE,
            BLOCK_K,
        )[0]  # fmt: skip
        centred = tl.where(valid, p - mean[:, None], 0.0)
        acc += centred * centred
    return mean, rstd_of(tl.sum(acc, axis=1), K, eps, NORM)


@triton.jit
def project_chunk(X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, Bias,
                  norm1, mean1, rstd1, n0, K, D, C: tl.constexpr, PATCH: tl.constexpr,
                  NORM1: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, W_FLAT: tl.constexpr,
                  CHANNELS_FIRST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Z[:, n0 : n0 + BLOCK_N] = norm1(patches) @ W.T + bias for BLOCK_M tokens, in ACC_DTYPE.

    W is read through its row stride and element strides (c, *patch), so a Linear weight
    (D, K) and a conv weight (D, C, *patch) are both used in place; the pre-norm parameters
    norm1 = (weight, bias) come in the K order (the launcher re-lays them for CHANNELS_FIRST).
    W rows are readable up to w_row_len >= K, zero beyond K: a re-laid weight pads them to a
    multiple of 16, so that the masks, like the rows, are 16-element aligned and its tiles load
    as vectors; the patch tile is 0 beyond K anyway. The GEMM operands are rounded to
    COMPUTE_DTYPE and accumulated in ACC_DTYPE on tensor cores."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    # Software prefetch: the next K tile is gathered before this one is used, so the gather's
    # latency overlaps the normalisation and tensor-core product (Triton pipelines only loads
    # that feed tl.dot unchanged; these are normalised in registers first).
    a_next = load_patches(
        X, x_strides, row_off, m_mask, 0, K, C, PATCH, CHANNELS_FIRST, ACC_DTYPE, BLOCK_K
    )[0]
    for k0 in range(0, K, BLOCK_K):
        a = a_next
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a_next = load_patches(
            X, x_strides, row_off, m_mask, k0 + BLOCK_K, K, C, PATCH, CHANNELS_FIRST, ACC_DTYPE,
            BLOCK_K,
        )[0]  # fmt: skip
        a = norm_apply(a, mean1, rstd1, norm1, offs_k, k_mask, NORM1, ACC_DTYPE)
        w_col = patch_cols(k0, K, C, PATCH, w_strides, W_FLAT, CHANNELS_FIRST, BLOCK_K)[2]
        w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wd + w_col[:, None]
        w = tl.load(w_ptrs, mask=(offs_k < w_row_len)[:, None] & n_mask[None, :], other=0.0)
        acc = mma(acc, a, w, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16)
    if Bias is not None:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)[None, :]
    return acc, offs_n, n_mask


@triton.jit
def add_pos(t, Pos, pos_rows, D, offs_n, mask, ACC_DTYPE: tl.constexpr):
    """t + the rows pos_rows (geometry.table_rows) of the position table (None: t) for a
    tile's tokens."""
    if Pos is not None:
        rows = pos_rows.to(tl.int64) * D
        t += tl.load(Pos + rows[:, None] + offs_n[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    return t
