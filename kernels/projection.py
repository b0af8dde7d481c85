"""The projection Z = norm1(P) @ W.T + bias of a tile of tokens, column chunk by column chunk
(docs/design.md, "Forward main loop"). Pure @triton.jit functions, no launches.

Two forms of the same product:

- :func:`project_raw`, the forward's: the raw patch tile goes to ``tl.dot`` as it was loaded,
  so Triton streams both operands through shared memory with asynchronous copies and keeps the
  tensor-core products in flight across K steps. The pre-norm is folded out of the loop:

      norm1(p) @ W.T + bias = rstd * (p @ W'.T - mean * s) + b'
      W' = W * g1 (rounded to the operand dtype),  s = row sums of W',  b' = W @ b1 + bias

  with W', s and b' made per call by kernels/fold.py, and the pre-norm's row statistics taken
  in the same loop from the tiles it already loads (:func:`prenorm_stats`). The subtraction
  runs on the fp32 accumulator in the epilogue (:func:`unfold_prenorm`), where it is exact up
  to fp32 accumulation even for raw 0..255 pixels (|mean| >> std). Inputs that are not exact
  in the operand dtype (fp32 images, autocast), and row blocks of nearly constant patches, are
  shifted by a per-token pivot before the product: p - c is small where p is not, so its
  rounding costs what rounding x̂ would (docs/design.md, "Forward main loop").
- :func:`project_chunk`, the backward's Z recompute: each patch tile is normalised in
  registers before the product.
"""

import triton
import triton.language as tl

from .gather import load_patches, raw_patches
from .geometry import patch_cols
from .norms import LAYER_NORM, NO_NORM, norm_apply, rstd_of
from .rounding import mma

# |mean| * rstd of a token above which the fold is not used for it: mean * s (forward) or the
# centring sums (backward, kernels/patch_embed_bwd_dw.py) would cancel nearly all of an fp32
# sum of exact products, and rstd (up to 1/sqrt(eps) on constant patches) magnifies what is
# left. Below it, with at most 64 tensor-core steps accumulated before the subtraction (a
# forward's K of 768 to 1024, a backward chunk of tokens), that error stays under the rounding
# of the normalised patch that the eager module does (tests/op/test_forward_folded.py and
# tests/op/test_backward_folded.py measure both).
SHIFT_RATIO = tl.constexpr(256.0)


@triton.jit
def fold_unfit(mean, rstd):
    """Tokens the fold would cancel on: |mean| * rstd above SHIFT_RATIO, or NaN statistics
    (the one test the backward's kernels share; the forward decides per row block)."""
    return (tl.abs(mean) * rstd <= SHIFT_RATIO) == 0


@triton.jit
def project_raw(X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, pivot, n0,
                K, D, C: tl.constexpr, PATCH: tl.constexpr, STATS: tl.constexpr,
                SHIFT: tl.constexpr, EVEN_K: tl.constexpr, PAIR: tl.constexpr,
                X_RUN: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, W_FLAT: tl.constexpr,
                CHANNELS_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """P @ W.T for BLOCK_M tokens and the columns n0 .. n0 + BLOCK_N, in ACC_DTYPE: P the raw
    patches (P - pivot per token with SHIFT), W read through its row stride and element
    strides, rows readable (zero beyond K) up to w_row_len. PAIR: also the next BLOCK_N
    columns, from the same patch tiles (the second result; else a copy of the first), which
    halves the patch traffic per column while each epilogue keeps the registers of one tile.
    With STATS, also the row sums of P - pivot and of its squares (see prenorm_stats); else
    zeros. EVEN_K: K is a multiple of BLOCK_K. X_RUN: the image's patch elements come in
    contiguous runs of X_RUN (a power of two) in the K order, each starting at a multiple of
    X_RUN elements (gather.raw_patches)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    w_rows = W + offs_n[None, :].to(tl.int64) * stride_wd
    w_rows_2 = w_rows + BLOCK_N * stride_wd
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    if PAIR:
        acc_2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    sum1 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    sum2 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        a, offs_k, k_mask = raw_patches(X, x_strides, row_off, m_mask, k0, K, C, PATCH, EVEN_K,
                                        X_RUN, CHANNELS_FIRST, BLOCK_K)  # fmt: skip
        if STATS or SHIFT:
            shifted = a.to(ACC_DTYPE) - pivot[:, None]
            if not EVEN_K:
                shifted = tl.where(k_mask[None, :], shifted, 0.0)
            if STATS:
                sum1 += tl.sum(shifted, axis=1)
                sum2 += tl.sum(shifted * shifted, axis=1)
            if SHIFT:
                a = shifted
        w_col = patch_cols(k0, K, C, PATCH, w_strides, W_FLAT, CHANNELS_FIRST, BLOCK_K)[2]
        w_mask = (offs_k < w_row_len)[:, None] & (offs_n < D)[None, :]
        w = tl.load(w_rows + w_col[:, None], mask=w_mask, other=0.0)
        acc = mma(acc, a, w, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16)
        if PAIR:
            w_mask_2 = (offs_k < w_row_len)[:, None] & (offs_n + BLOCK_N < D)[None, :]
            w = tl.load(w_rows_2 + w_col[:, None], mask=w_mask_2, other=0.0)
            acc_2 = mma(acc_2, a, w, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16)
    return acc, acc_2 if PAIR else acc, sum1, sum2


@triton.jit
def prenorm_stats(sum1, sum2, pivot, K, eps, NORM: tl.constexpr):
    """The pre-norm's mean and rstd from project_raw's sums over the K columns of p - pivot
    (an RMSNorm's pivot is 0: its sum of squares). Shifting by a value of the patch bounds the
    cancellation of sum2 - sum1^2 / K by K times the accumulation's rounding, far below what
    rounding the normalised patch costs, however large |mean| / std is."""
    mean = pivot
    m2 = sum2
    if NORM == LAYER_NORM:
        mean = pivot + sum1 / K
        m2 = tl.maximum(sum2 - sum1 * (sum1 / K), 0.0)
    return mean, rstd_of(m2, K, eps, NORM)


@triton.jit
def unfold_prenorm(acc, centre, rstd1, ColSum, Bias, offs_n, n_mask, NORM1: tl.constexpr,
                   ACC_DTYPE: tl.constexpr):  # fmt: skip
    """Z from project_raw's product with the folded weight: rstd1 * (acc - centre * s) + b' (a
    LayerNorm, centre = its mean less the pivot the product's operand was shifted by; an
    RMSNorm does not centre; no pre-norm: acc + bias). ColSum holds s, Bias b' (or the bias,
    or None)."""
    z = acc
    if NORM1 == LAYER_NORM:
        s = tl.load(ColSum + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)
        z = z - centre[:, None] * s[None, :]
    if NORM1 != NO_NORM:
        z = z * rstd1[:, None]
    if Bias is not None:
        z += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)[None, :]
    return z


@triton.jit
def project_chunk(X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, Bias,
                  norm1, mean1, rstd1, n0, K, D, C: tl.constexpr, PATCH: tl.constexpr,
                  NORM1: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, W_FLAT: tl.constexpr,
                  CHANNELS_FIRST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Z[:, n0 : n0 + BLOCK_N] = norm1(patches) @ W.T + bias for BLOCK_M tokens, in ACC_DTYPE,
    the patch tile normalised before the product (the backward's recompute).

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
    # Software prefetch: the next K tile is gathered before this one is used. The tile is
    # normalised in registers before the product, which keeps Triton from leaving the
    # tensor-core product in flight across steps (project_raw avoids that).
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
