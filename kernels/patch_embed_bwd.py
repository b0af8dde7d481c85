"""Fused patch-embedding backward (docs/design.md, "Backward": x̂ normalised patch, ẑ
normalised Z).

Three passes, all deterministic (per-program partial sums, no atomics):

1. ``_bwd_dz_kernel`` (kernels/patch_embed_bwd_dz.py, per token tile): dY back through the
   stem norm, the position table and the post-norm to dZ, with column partials.
2. ``_bwd_dw_kernel`` (per weight tile and token split): G = dZ^T x̂ partials, one per split,
   summed by the launcher. Then ``_bwd_param_kernel`` (per K tile): dW = G diag(g1) + dbias b1^T,
   dg1 = sum_d W * G, db1 = W^T dbias. One GEMM for all parameter gradients.
3. ``_bwd_dx_kernel`` (per token tile, only when the image needs a gradient): dA = dZ W, the
   pre-norm backward, scattered straight into the image layout (patches do not overlap).

The dZ kernel also stores each token's image offset (XRowOff), and its dZ row offset where rows
are not evenly spaced (DZRowOff), so that the dW GEMM, which visits token tiles in a strided
order, does not divide by the image geometry on every step. Each kernel walks K in the order
its launch picks (CHANNELS_FIRST, see geometry.patch_cols); G is kept in the dW GEMM's order,
and the parameter kernel writes dW, dg1, db1 through their own strides.

Device code only: the launch module allocates buffers and builds grids.
"""

import triton
import triton.language as tl

from .gather import READ_BACK, load_patches, store_patches
from .geometry import patch_cols, token_offsets, token_rows
from .norms import (
    MEAN1,
    NO_NORM,
    RSTD1,
    load_stat,
    norm_bwd,
    norm_bwd_sums,
    normalize,
    scale_cols,
)
from .rounding import cast, mma


@triton.jit
def _bwd_dw_kernel(
    X, x_strides,  # image and its element strides (c, *spatial)
    Stats,
    XRowOff,  # (M,) int64 image offset of each token's first pixel (from the dZ kernel)
    DZ, dz_strides,  # dZ (B, N, D) with strides (the DZ buffer, or dY without norms over D)
    DZRowOff,  # (M,) int64 offset of each token's dZ row (from the dZ kernel); None: m * n stride
    GPart,  # out: (S, D, K) ACC_DTYPE partials of G = dZ^T x̂ over token splits
    M, K, D,
    C: tl.constexpr, PATCH: tl.constexpr, NORM1: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # a power of two dividing every token's offset in the image
    DZ_ALIGN: tl.constexpr,  # a power of two dividing every DZRowOff (vector loads of dZ)
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    splits = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k0 = pid_k * BLOCK_K
    acc = tl.zeros([BLOCK_D, BLOCK_K], dtype=ACC_DTYPE)
    # Token offsets come precomputed: dividing by the grid here, on every step, would cost
    # more instructions than the tensor-core product; their alignment, which the division
    # would have shown the compiler, is given instead (vector loads). The patch tile of the
    # next step is gathered at the end of this one (software prefetch, as in
    # projection.project_chunk).
    step = splits * BLOCK_M
    offs_next = pid_s * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_off = tl.load(XRowOff + offs_next, mask=offs_next < M, other=0)
    row_off = tl.multiple_of(row_off, ROW_ALIGN)
    k_mask = k0 + tl.arange(0, BLOCK_K) < K
    x_next = load_patches(
        X, x_strides, row_off, offs_next < M, k0, K, C, PATCH, CHANNELS_FIRST, ACC_DTYPE, BLOCK_K
    )[0]
    for m_start in range(pid_s * BLOCK_M, M, step):
        offs_m = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mask = offs_m < M
        x_hat = x_next
        offs_next = offs_m + step
        row_off = tl.load(XRowOff + offs_next, mask=offs_next < M, other=0)
        row_off = tl.multiple_of(row_off, ROW_ALIGN)
        if NORM1 != NO_NORM:
            mean1 = load_stat(Stats, MEAN1, offs_m, m_mask, M)
            rstd1 = load_stat(Stats, RSTD1, offs_m, m_mask, M)
            mask = m_mask[:, None] & k_mask[None, :]
            x_hat = tl.where(mask, normalize(x_hat, mean1, rstd1, NORM1), 0.0)
        if DZRowOff is not None:  # rows not evenly spaced (after prefix rows): no division
            dz_rows = tl.multiple_of(tl.load(DZRowOff + offs_m, mask=m_mask, other=0), DZ_ALIGN)
        else:
            dz_rows = offs_m * dz_strides[1]
        dz_ptrs = DZ + dz_rows[:, None] + (offs_d[None, :] * dz_strides[2])
        dz = tl.load(dz_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        acc = mma(acc, tl.trans(dz), x_hat, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16)
        x_next = load_patches(
            X, x_strides, row_off, offs_next < M, k0, K, C, PATCH, CHANNELS_FIRST, ACC_DTYPE,
            BLOCK_K,
        )[0]  # fmt: skip
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = GPart + pid_s.to(tl.int64) * D * K + offs_d[:, None] * K + offs_k[None, :]
    tl.store(out, acc, mask=d_mask[:, None] & (offs_k < K)[None, :])


@triton.jit
def _bwd_param_kernel(
    G,  # (D, K) ACC_DTYPE: G = dZ^T x̂ in the dW GEMM's K order, its token splits summed
    DZSum,  # (D,) ACC_DTYPE: sum over tokens of dZ (= dbias)
    W, stride_wd, w_strides,  # the original weight
    norm1,  # (weight, bias) of the pre-norm in their own (*patch, c) order; each may be None
    p_strides,  # element strides (c, *patch) of those (K,) parameters
    DW, stride_dwd, dw_strides,  # out: in the weight's shape and dtype
    dnorm1,  # out: (dg1, db1) in the pre-norm parameters' dtype and order, where they exist
    K, D,
    C: tl.constexpr, PATCH: tl.constexpr, ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
    W_FLAT: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    G1, B1 = norm1
    k0 = tl.program_id(0) * BLOCK_K
    offs_k, k_mask, w_col = patch_cols(k0, K, C, PATCH, w_strides, W_FLAT, CHANNELS_FIRST,
                                       BLOCK_K)  # fmt: skip
    dw_col = patch_cols(k0, K, C, PATCH, dw_strides, W_FLAT, CHANNELS_FIRST, BLOCK_K)[2]
    p_col = patch_cols(k0, K, C, PATCH, p_strides, not CHANNELS_FIRST, CHANNELS_FIRST,
                       BLOCK_K)[2]  # fmt: skip
    if G1 is not None:
        g1 = tl.load(G1 + p_col, mask=k_mask, other=0.0).to(ACC_DTYPE)
    if B1 is not None:
        b1 = tl.load(B1 + p_col, mask=k_mask, other=0.0).to(ACC_DTYPE)
    dg1 = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    db1 = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        mask = d_mask[:, None] & k_mask[None, :]
        g = tl.load(G + offs_d[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0.0)
        dw = g
        if G1 is not None or B1 is not None:
            w = tl.load(W + offs_d[:, None].to(tl.int64) * stride_wd + w_col[None, :], mask=mask,
                        other=0.0).to(ACC_DTYPE)  # fmt: skip
            if G1 is not None:
                dg1 += tl.sum(w * g, axis=0)
                dw = g * g1[None, :]
            if B1 is not None:
                dbias = tl.load(DZSum + offs_d, mask=d_mask, other=0.0)
                db1 += tl.sum(w * dbias[:, None], axis=0)
                dw += dbias[:, None] * b1[None, :]
        out = DW + offs_d[:, None].to(tl.int64) * stride_dwd + dw_col[None, :]
        tl.store(out, cast(dw, DW.dtype.element_ty, EMULATE_BF16), mask=mask)
    if G1 is not None:
        tl.store(dnorm1[0] + p_col, cast(dg1, dnorm1[0].dtype.element_ty, EMULATE_BF16),
                 mask=k_mask)  # fmt: skip
    if B1 is not None:
        tl.store(dnorm1[1] + p_col, cast(db1, dnorm1[1].dtype.element_ty, EMULATE_BF16),
                 mask=k_mask)  # fmt: skip


@triton.jit
def _bwd_dx_kernel(
    X, stride_xb, x_strides, W, stride_wd, w_strides, w_row_len,
    G1,  # pre-norm weight (K,) in the K order, or None
    Stats,
    DZ, dz_strides,  # dZ (B, rows, D) with strides
    Keep,  # (B, rows) int64 grid positions embedded per image, or None
    DX, stride_dxb, dx_strides,  # out: image gradient with its own strides, or with DX_ROWS
    # a (M, C, *patch) buffer of per-token patch gradients: row stride, element strides
    M, K, D, rows, grid,
    C: tl.constexpr, PATCH: tl.constexpr, NORM1: tl.constexpr, DZ_FLAT: tl.constexpr,
    DX_ROWS: tl.constexpr,  # per-token rows (a Keep may repeat a patch): summed by the launcher
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr, W_FLAT: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    m_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_m, m_mask, row_off, _ = token_rows(m_start, M, rows, grid, Keep, PATCH, stride_xb,
                                            x_strides, BLOCK_M)  # fmt: skip
    if DX_ROWS:
        grad_off = offs_m * stride_dxb
    else:
        grad_off = token_rows(m_start, M, rows, grid, Keep, PATCH, stride_dxb, dx_strides,
                              BLOCK_M)[2]  # fmt: skip
    dz_rows = DZ + token_offsets(offs_m, rows, dz_strides, DZ_FLAT)
    mean1 = load_stat(Stats, MEAN1, offs_m, m_mask, M)
    rstd1 = load_stat(Stats, RSTD1, offs_m, m_mask, M)
    sum_g = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    sum_gx = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    # Pass 1: dA = dZ W chunk by chunk over K; with a pre-norm keep g = dA * g1 in DX (each
    # program owns its tokens' pixels) and reduce the rows of g and g * x̂.
    for k0 in range(0, K, BLOCK_K):
        offs_k, k_mask, w_col = patch_cols(k0, K, C, PATCH, w_strides, W_FLAT, CHANNELS_FIRST,
                                           BLOCK_K)  # fmt: skip
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            dz = tl.load(dz_rows[:, None] + offs_d[None, :] * dz_strides[2],
                         mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
            w_mask = d_mask[:, None] & (offs_k < w_row_len)[None, :]
            w = tl.load(W + offs_d[:, None].to(tl.int64) * stride_wd + w_col[None, :],
                        mask=w_mask, other=0.0)  # fmt: skip
            acc = mma(acc, dz, w, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16)
        if NORM1 != NO_NORM:
            x_tile = load_patches(X, x_strides, row_off, m_mask, k0, K, C, PATCH, CHANNELS_FIRST,
                                  ACC_DTYPE, BLOCK_K)  # fmt: skip
            x_hat = normalize(x_tile[0], mean1, rstd1, NORM1)
            acc = tl.where(x_tile[3], scale_cols(acc, G1, offs_k, k_mask, ACC_DTYPE), 0.0)
            sum_g, sum_gx = norm_bwd_sums(sum_g, sum_gx, acc, x_hat)
        store_patches(DX, dx_strides, grad_off, m_mask, acc, k0, K, C, PATCH, CHANNELS_FIRST,
                      EMULATE_BF16, BLOCK_K)  # fmt: skip
    if NORM1 != NO_NORM:
        # Pass 2: dP = rstd1 * (g - mean(g) - x̂ * mean(g * x̂)), g read back from DX (no
        # mean(g) term for an RMSNorm).
        mean_g = sum_g / K
        mean_gx = sum_gx / K
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            x = load_patches(X, x_strides, row_off, m_mask, k0, K, C, PATCH, CHANNELS_FIRST,
                             ACC_DTYPE, BLOCK_K)[0]  # fmt: skip
            g = load_patches(DX, dx_strides, grad_off, m_mask, k0, K, C, PATCH, CHANNELS_FIRST,
                             ACC_DTYPE, BLOCK_K, READ_BACK)[0]  # fmt: skip
            dp = norm_bwd(g, normalize(x, mean1, rstd1, NORM1), rstd1, mean_g, mean_gx, NORM1)
            store_patches(DX, dx_strides, grad_off, m_mask, dp, k0, K, C, PATCH, CHANNELS_FIRST,
                          EMULATE_BF16, BLOCK_K)  # fmt: skip
