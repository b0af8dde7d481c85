"""Fused patch-embedding backward (notation of DESIGN §5: x̂ normalised patch, ẑ normalised Z).

Three passes, each a kernel below, all deterministic (per-program partial sums, no atomics):

1. ``_bwd_dz_kernel`` (per token tile): recompute Z with the forward's projection chunk, then the
   post-norm backward dZ = rstd2 * (g - mean(g) - ẑ * mean(g * ẑ)), g = dY * g2, and per-program
   column partials of dZ, dY * ẑ and dY (-> dbias, dg2, db2).
2. ``_bwd_dw_kernel`` (per weight tile and token split): G = dZ^T x̂ partials, one per split,
   summed by the launcher. Then ``_bwd_param_kernel`` (per K tile): dW = G diag(g1) + dbias b1^T,
   dg1 = sum_d W * G, db1 = W^T dbias. One GEMM for all parameter gradients.
3. ``_bwd_dx_kernel`` (per token tile, only when the image needs a gradient): dA = dZ W, the
   pre-norm backward, scattered straight into the image layout (patches do not overlap).

The dZ kernel also stores each token's image offset (RowOff) so that the dW GEMM, which visits
token tiles in a strided order, does not divide by the image geometry on every step. Each
kernel walks K in the order its launch picks (CIJ, see patch_tiles.patch_cols); G is kept in
the dW GEMM's order, and the parameter kernel writes dW, dg1, db1 through their own offsets.

Device code only: the launch module allocates buffers and builds grids.
"""

import triton
import triton.language as tl

from .patch_tiles import (
    load_patches,
    param_cols,
    patch_cols,
    project_chunk,
    store_patches,
    token_rows,
)
from .rounding import cast, mma

# Second passes read what the same program stored in the first: through L2 (".cg"), never a
# possibly stale L1 line; the tl.debug_barrier() before them orders the threads.
READ_BACK = tl.constexpr(".cg")


@triton.jit
def _dy_rows(offs_m, NP, stride_b, stride_n, FLAT: tl.constexpr):
    """Offsets of token rows in a (B, N, D) tensor with any strides (stride 0 included).
    FLAT: stride_b == N * stride_n (contiguous or fully expanded), so no division is needed."""
    if FLAT:
        return offs_m * stride_n
    tok = offs_m.to(tl.int32)  # 32-bit division, as token_rows
    return (tok // NP).to(tl.int64) * stride_b + (tok % NP).to(tl.int64) * stride_n


@triton.jit
def _bwd_dz_kernel(
    X, W, Bias, G1, B1, G2,  # forward inputs (dummies where absent)
    Stats,  # (4, M): mean1, rstd1, mean2, rstd2 from the forward
    DY,  # upstream gradient (B, N, D), any strides
    DZ,  # out: (M, D) contiguous, COMPUTE_DTYPE (only written with POST_NORM)
    Partials,  # out: (3, P, D) ACC: column sums of dZ, dY * ẑ, dY per program
    RowOff,  # out: (M,) int64 image offset of each token's first pixel, for the dW kernel
    M, K, KW, D, C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NP, WP,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wd, stride_wc, stride_wi, stride_wj,
    stride_dyb, stride_dyn, stride_dyd, DY_FLAT: tl.constexpr,
    PRE_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, POST_NORM: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    INTERPRETED: tl.constexpr, W_FLAT: tl.constexpr, CIJ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_m, m_mask, row_off = token_rows(
        pid.to(tl.int64) * BLOCK_M, M, NP, WP, PH, PW, stride_xb, stride_xh, stride_xw, BLOCK_M
    )
    mean1 = tl.load(Stats + offs_m, mask=m_mask, other=0.0)
    rstd1 = tl.load(Stats + M + offs_m, mask=m_mask, other=0.0)
    mean2 = tl.load(Stats + 2 * M + offs_m, mask=m_mask, other=0.0)
    rstd2 = tl.load(Stats + 3 * M + offs_m, mask=m_mask, other=0.0)
    tl.store(RowOff + offs_m, row_off, mask=m_mask)
    dy_rows = DY + _dy_rows(offs_m, NP, stride_dyb, stride_dyn, DY_FLAT)
    dz_rows = DZ + offs_m[:, None] * D
    part_dz = Partials + pid * D
    part_dg2 = Partials + (programs + pid) * D
    part_db2 = Partials + (2 * programs + pid) * D

    if POST_NORM:
        # Pass 1: recompute Z chunk by chunk, keep ẑ in DZ, reduce the rows of g and g * ẑ.
        sum_g = tl.zeros([BLOCK_M], dtype=ACC)
        sum_gz = tl.zeros([BLOCK_M], dtype=ACC)
        for n0 in range(0, D, BLOCK_N):
            z, offs_n, n_mask = project_chunk(
                X, W, Bias, G1, B1, row_off, m_mask, mean1, rstd1, n0, K, KW, D, C, PH, PW,
                stride_xc, stride_xh, stride_xw, stride_wd, stride_wc, stride_wi, stride_wj,
                PRE_NORM, HAS_BIAS, COMPUTE_DTYPE, DOT_PRECISION, ACC, INTERPRETED, W_FLAT, CIJ,
                BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            mask = m_mask[:, None] & n_mask[None, :]
            zhat = tl.where(mask, (z - mean2[:, None]) * rstd2[:, None], 0.0)
            dy = tl.load(dy_rows[:, None] + offs_n[None, :] * stride_dyd, mask=mask, other=0.0)
            dy = dy.to(ACC)
            g = dy * tl.load(G2 + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
            sum_g += tl.sum(g, axis=1)
            sum_gz += tl.sum(g * zhat, axis=1)
            tl.store(part_dg2 + offs_n, tl.sum(dy * zhat, axis=0), mask=n_mask)
            tl.store(part_db2 + offs_n, tl.sum(dy, axis=0), mask=n_mask)
            tl.store(dz_rows + offs_n[None, :], cast(zhat, COMPUTE_DTYPE, INTERPRETED), mask=mask)
        mean_g = sum_g / D
        mean_gz = sum_gz / D
        # Pass 2: dZ from ẑ (read back by the program that wrote it) and dY.
        tl.debug_barrier()
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            mask = m_mask[:, None] & n_mask[None, :]
            zhat = tl.load(
                dz_rows + offs_n[None, :], mask=mask, other=0.0, cache_modifier=READ_BACK
            )
            zhat = zhat.to(ACC)
            dy = tl.load(dy_rows[:, None] + offs_n[None, :] * stride_dyd, mask=mask, other=0.0)
            g = dy.to(ACC) * tl.load(G2 + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
            dz = rstd2[:, None] * (g - mean_g[:, None] - zhat * mean_gz[:, None])
            dz = tl.where(mask, dz, 0.0)
            tl.store(part_dz + offs_n, tl.sum(dz, axis=0), mask=n_mask)
            tl.store(dz_rows + offs_n[None, :], cast(dz, COMPUTE_DTYPE, INTERPRETED), mask=mask)
    else:
        # dZ is dY itself: only its column sums are needed here.
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            mask = m_mask[:, None] & n_mask[None, :]
            dy = tl.load(dy_rows[:, None] + offs_n[None, :] * stride_dyd, mask=mask, other=0.0)
            tl.store(part_dz + offs_n, tl.sum(dy.to(ACC), axis=0), mask=n_mask)


@triton.jit
def _bwd_dw_kernel(
    X, Stats,
    RowOff,  # (M,) int64 image offset of each token's first pixel (from the dZ kernel)
    DZ,  # dZ (B, N, D) with strides (the DZ buffer, or dY without post-norm)
    GPart,  # out: (S, D, K) ACC partials of G = dZ^T x̂ over token splits
    M, K, D, C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NP, WP,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_dzb, stride_dzn, stride_dzd, DZ_FLAT: tl.constexpr,
    PRE_NORM: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr, INTERPRETED: tl.constexpr, CIJ: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # a power of two dividing every token's offset in the image
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    splits = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k0 = pid_k * BLOCK_K
    acc = tl.zeros([BLOCK_D, BLOCK_K], dtype=ACC)
    # Token offsets come precomputed: dividing by NP and WP here, on every step, would cost
    # more instructions than the tensor-core product; their alignment, which the division
    # would have shown the compiler, is given instead (vector loads). The patch tile of the
    # next step is gathered at the end of this one (software prefetch, as in project_chunk).
    step = splits * BLOCK_M
    offs_next = pid_s * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_off = tl.load(RowOff + offs_next, mask=offs_next < M, other=0)
    row_off = tl.multiple_of(row_off, ROW_ALIGN)
    x_next, offs_k, k_mask, mask = load_patches(
        X, row_off, offs_next < M, k0, K, C, PH, PW, stride_xc, stride_xh, stride_xw, CIJ, ACC,
        BLOCK_K
    )  # fmt: skip
    for m_start in range(pid_s * BLOCK_M, M, step):
        offs_m = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mask = offs_m < M
        xhat = x_next
        mask = m_mask[:, None] & k_mask[None, :]
        offs_next = offs_m + step
        row_off = tl.load(RowOff + offs_next, mask=offs_next < M, other=0)
        row_off = tl.multiple_of(row_off, ROW_ALIGN)
        if PRE_NORM:
            mean1 = tl.load(Stats + offs_m, mask=m_mask, other=0.0)
            rstd1 = tl.load(Stats + M + offs_m, mask=m_mask, other=0.0)
            xhat = tl.where(mask, (xhat - mean1[:, None]) * rstd1[:, None], 0.0)
        dz_ptrs = (
            DZ
            + _dy_rows(offs_m, NP, stride_dzb, stride_dzn, DZ_FLAT)[:, None]
            + (offs_d[None, :] * stride_dzd)
        )
        dz = tl.load(dz_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        acc = mma(acc, tl.trans(dz), xhat, COMPUTE_DTYPE, DOT_PRECISION, ACC, INTERPRETED)
        x_next, offs_k, k_mask, mask_next = load_patches(
            X, row_off, offs_next < M, k0, K, C, PH, PW, stride_xc, stride_xh, stride_xw, CIJ, ACC,
            BLOCK_K
        )  # fmt: skip
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = GPart + pid_s.to(tl.int64) * D * K + offs_d[:, None] * K + offs_k[None, :]
    tl.store(out, acc, mask=d_mask[:, None] & (offs_k < K)[None, :])


@triton.jit
def _bwd_param_kernel(
    G,  # (D, K) ACC: G = dZ^T x̂ in the dW GEMM's K order, its token splits already summed
    DZSum,  # (D,) ACC: sum over tokens of dZ (= dbias)
    W, G1, B1,  # the original weight and pre-norm parameters, (i, j, c) for G1, B1
    DW,  # out: in the weight's shape and dtype, strides (d, c, i, j)
    DG1, DB1,  # out: (K,) in the pre-norm parameters' dtype and (i, j, c) order (PRE_NORM)
    K, D, C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    stride_wd, stride_wc, stride_wi, stride_wj,
    stride_gd, stride_gc, stride_gi, stride_gj,
    PRE_NORM: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr, W_FLAT: tl.constexpr,
    CIJ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    k0 = tl.program_id(0) * BLOCK_K
    offs_k, k_mask, w_col = patch_cols(
        k0, K, C, PH, PW, stride_wc, stride_wi, stride_wj, W_FLAT, CIJ, BLOCK_K
    )
    dw_k, dw_kmask, dw_col = patch_cols(
        k0, K, C, PH, PW, stride_gc, stride_gi, stride_gj, W_FLAT, CIJ, BLOCK_K
    )
    g_col = param_cols(k0, K, C, PH, PW, CIJ, BLOCK_K)
    if PRE_NORM:
        g1 = tl.load(G1 + g_col, mask=k_mask, other=0.0).to(ACC)
        b1 = tl.load(B1 + g_col, mask=k_mask, other=0.0).to(ACC)
    dg1 = tl.zeros([BLOCK_K], dtype=ACC)
    db1 = tl.zeros([BLOCK_K], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        mask = d_mask[:, None] & k_mask[None, :]
        g = tl.load(G + offs_d[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0.0)
        if PRE_NORM:
            w = tl.load(W + offs_d[:, None].to(tl.int64) * stride_wd + w_col[None, :], mask=mask,
                        other=0.0).to(ACC)  # fmt: skip
            dbias = tl.load(DZSum + offs_d, mask=d_mask, other=0.0)
            dg1 += tl.sum(w * g, axis=0)
            db1 += tl.sum(w * dbias[:, None], axis=0)
            g = g * g1[None, :] + dbias[:, None] * b1[None, :]
        dw = DW + offs_d[:, None].to(tl.int64) * stride_gd + dw_col[None, :]
        tl.store(dw, cast(g, DW.dtype.element_ty, INTERPRETED), mask=mask)
    if PRE_NORM:
        tl.store(DG1 + g_col, cast(dg1, DG1.dtype.element_ty, INTERPRETED), mask=k_mask)
        tl.store(DB1 + g_col, cast(db1, DB1.dtype.element_ty, INTERPRETED), mask=k_mask)


@triton.jit
def _bwd_dx_kernel(
    X, W, G1, Stats,
    DZ,  # dZ (B, N, D) with strides
    DX,  # out: image gradient (B, C, H, W) with its own strides
    M, K, KW, D, C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NP, WP,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_wd, stride_wc, stride_wi, stride_wj,
    stride_dzb, stride_dzn, stride_dzd, DZ_FLAT: tl.constexpr,
    PRE_NORM: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr, INTERPRETED: tl.constexpr, W_FLAT: tl.constexpr, CIJ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    m_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_m, m_mask, row_off = token_rows(
        m_start, M, NP, WP, PH, PW, stride_xb, stride_xh, stride_xw, BLOCK_M
    )
    grad_m, grad_mask, grad_off = token_rows(
        m_start, M, NP, WP, PH, PW, stride_gb, stride_gh, stride_gw, BLOCK_M
    )
    dz_rows = DZ + _dy_rows(offs_m, NP, stride_dzb, stride_dzn, DZ_FLAT)
    mean1 = tl.load(Stats + offs_m, mask=m_mask, other=0.0)
    rstd1 = tl.load(Stats + M + offs_m, mask=m_mask, other=0.0)
    sum_g = tl.zeros([BLOCK_M], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_M], dtype=ACC)
    # Pass 1: dA = dZ W chunk by chunk over K; with a pre-norm keep g = dA * g1 in DX (each
    # program owns its tokens' pixels) and reduce the rows of g and g * x̂.
    for k0 in range(0, K, BLOCK_K):
        offs_k, k_mask, w_col = patch_cols(
            k0, K, C, PH, PW, stride_wc, stride_wi, stride_wj, W_FLAT, CIJ, BLOCK_K
        )
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            dz = tl.load(dz_rows[:, None] + offs_d[None, :] * stride_dzd,
                         mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
            w = tl.load(W + offs_d[:, None].to(tl.int64) * stride_wd + w_col[None, :],
                        mask=d_mask[:, None] & (offs_k < KW)[None, :], other=0.0)  # fmt: skip
            acc = mma(acc, dz, w, COMPUTE_DTYPE, DOT_PRECISION, ACC, INTERPRETED)
        if PRE_NORM:
            x, x_k, x_kmask, mask = load_patches(
                X, row_off, m_mask, k0, K, C, PH, PW, stride_xc, stride_xh, stride_xw, CIJ, ACC,
                BLOCK_K
            )  # fmt: skip
            xhat = (x - mean1[:, None]) * rstd1[:, None]
            g1 = tl.load(G1 + offs_k, mask=k_mask, other=0.0).to(ACC)  # in the K order
            acc = tl.where(mask, acc * g1, 0.0)
            sum_g += tl.sum(acc, axis=1)
            sum_gx += tl.sum(acc * xhat, axis=1)
        store_patches(DX, grad_off, m_mask, acc, k0, K, C, PH, PW, stride_gc, stride_gh,
                      stride_gw, CIJ, INTERPRETED, BLOCK_K)  # fmt: skip
    if PRE_NORM:
        # Pass 2: dP = rstd1 * (g - mean(g) - x̂ * mean(g * x̂)), read back from DX.
        mean_g = sum_g / K
        mean_gx = sum_gx / K
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            x, x_k, x_kmask, x_mask = load_patches(
                X, row_off, m_mask, k0, K, C, PH, PW, stride_xc, stride_xh, stride_xw, CIJ, ACC,
                BLOCK_K
            )  # fmt: skip
            g, g_k, g_kmask, g_mask = load_patches(
                DX,
                grad_off,
                m_mask,
                k0,
                K,
                C,
                PH,
                PW,
                stride_gc,
                stride_gh,
                stride_gw,
                CIJ,
                ACC,
                BLOCK_K,
                READ_BACK,
            )
            xhat = (x - mean1[:, None]) * rstd1[:, None]
            dp = rstd1[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
            store_patches(DX, grad_off, m_mask, dp, k0, K, C, PH, PW, stride_gc, stride_gh,
                          stride_gw, CIJ, INTERPRETED, BLOCK_K)  # fmt: skip
