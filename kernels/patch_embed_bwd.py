"""Fused patch-embedding backward (docs/design.md, "Backward": x̂ normalised patch, ẑ
normalised Z). Two kernels for the parameters, a third for the image:

1. ``_bwd_dz_kernel`` (kernels/patch_embed_bwd_dz.py, persistent over token tiles): dY back
   through the stem norm, the position table and the post-norm to dZ (or Ẑ = dZ * rstd1, the
   dW GEMM's folded operand), with per-program column partials.
2. ``_bwd_dw_kernel``: every parameter gradient, in the parameters' dtypes. Its programs are
   column programs (the vector gradients over D from the column partials), table programs (the
   position table's), and, the most, the dW GEMM's: G = dZᵀ x̂ per weight tile and token split
   (kernels/patch_embed_bwd_dw.py), whose last split sums the splits and finishes dW, dg1 and
   db1 (kernels/patch_embed_bwd_params.py). All sums in a fixed order, no float atomics.
3. ``_bwd_dx_kernel`` (per token tile, only when the image needs a gradient): dA = dZ W, the
   pre-norm backward, scattered straight into the image layout (patches do not overlap).

Each kernel walks K in the order its launch picks (CHANNELS_FIRST, see geometry.patch_cols); G
is kept in the dW GEMM's order, and dW, dg1, db1 are written through their own strides.

Device code only: the launch module allocates buffers and builds grids.
"""

import triton
import triton.language as tl

from .counters import arrived_last
from .gather import READ_BACK, load_patches, store_patches
from .geometry import patch_cols, token_offsets, token_rows
from .norms import MEAN1, NO_NORM, RSTD1, load_stat, norm_bwd, norm_bwd_sums, normalize, scale_cols
from .patch_embed_bwd_dw import split_partial
from .patch_embed_bwd_params import (
    PART_DZ,
    column_program,
    finish_tile,
    slice_sum,
    split_bounds,
    table_program,
)
from .rounding import mma


@triton.jit
def _bwd_dw_kernel(
    X, x_strides,  # image and its element strides (c, *spatial)
    Stats,  # (len(STAT_ROWS), M) the forward's row statistics
    XRowOff,  # (M,) int64 image offset of each token's first pixel (from the dZ kernel)
    DZ, dz_strides,  # the GEMM's dZ operand (B, N, D) with strides: the dZ kernel's buffer (Ẑ
    # with DZ_SCALED), or dY without norms over D
    DZRowOff,  # (M,) int64 offset of each token's dZ row (from the dZ kernel); None: m * n stride
    VPart, Hostile,  # the dZ kernel's centring sums and flags per token group, or None
    Tiles,  # (GEMM programs, tiles per split) int32 scratch: the centred fold's second loop
    Partials, n_parts,  # (len(COLUMN_SUMS), n_parts, D) the dZ kernel's column partials
    GPart,  # (splits, D, K) ACC_DTYPE scratch: G per token split
    SplitSums,  # (K tiles, splits, D) ACC_DTYPE scratch: dbias per split (a pre-norm bias)
    DG1Part,  # (2, D tiles, K) ACC_DTYPE scratch: dg1 and db1 per weight tile
    Counters,  # (D tiles * K tiles + K tiles,) int32, zeroed by the dZ kernel
    W, stride_wd, w_strides,  # the original weight
    norm1,  # (weight, bias) of the pre-norm in their own (*patch, c) order; each may be None
    p_strides,  # element strides (c, *patch) of those (K,) parameters
    DW, stride_dwd, dw_strides,  # out: in the weight's shape and dtype
    dnorm1,  # out: (dg1, db1) in the pre-norm parameters' dtype and order, where they exist
    DBias, dnorm2, dnorm3,  # out: the bias's, post-norm's and stem norm's gradients, or None
    prefix3,  # (D,) ACC_DTYPE parts of dg3 and db3 from the prefix rows, or None
    DT, dt_strides,  # dT (batch, rows, D) for the position table's gradient, or None
    DPos,  # out: (rows, D) the position table's gradient, or None
    M, K, D, batch, rows, splits,
    column_programs, table_programs,  # programs before the GEMM's, in this order
    C: tl.constexpr, PATCH: tl.constexpr, NORM1: tl.constexpr,
    FOLD: tl.constexpr,  # both GEMM operands as stored (kernels/patch_embed_bwd_dw.py)
    CENTRED: tl.constexpr,  # folded with a LayerNorm pre-norm (DZ holds Ẑ = dZ * rstd1)
    EVEN_K: tl.constexpr, X_RUN: tl.constexpr,  # as the forward's (gather.raw_patches)
    ROW_ALIGN: tl.constexpr,  # a power of two dividing every token's offset in the image
    DZ_ALIGN: tl.constexpr,  # a power of two dividing every DZRowOff (vector loads of dZ)
    CHANNELS_FIRST: tl.constexpr, W_FLAT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,  # token tiles per chunk of the centred fold
    V_ROWS: tl.constexpr,  # tokens per group of the dZ kernel's centring sums
    FIN_D: tl.constexpr,  # D rows per step of the finishing sums
    SUM_ROWS: tl.constexpr,  # rows per step of the fixed-order sums
    BLOCK_C: tl.constexpr,  # columns per column program
    BLOCK_B: tl.constexpr, TABLE_N: tl.constexpr, TABLE_D: tl.constexpr,  # table programs
):  # fmt: skip
    pid = tl.program_id(0)
    if pid < column_programs:
        column_program(pid, Partials, n_parts, splits, DBias, dnorm2, dnorm3, prefix3, D,
                       ACC_DTYPE, EMULATE_BF16, BLOCK_C, SUM_ROWS)  # fmt: skip
    elif pid < column_programs + table_programs:
        table_program(pid - column_programs, DT, dt_strides, batch, rows, D, DPos, ACC_DTYPE,
                      EMULATE_BF16, BLOCK_B, TABLE_N, TABLE_D)  # fmt: skip
    else:
        # Weight tiles fastest, then token splits: programs that run together share tokens.
        gemm = pid - column_programs - table_programs
        d_tiles = tl.cdiv(D, BLOCK_D)
        tiles = d_tiles * tl.cdiv(K, BLOCK_K)
        tile = gemm % tiles
        j, k, s = tile % d_tiles, tile // d_tiles, gemm // tiles
        split_partial(
            j, k, s, splits, X, x_strides, Stats, XRowOff, DZ, dz_strides, DZRowOff, VPart,
            Hostile, Tiles, gemm, GPart, M, K, D, C,
            PATCH, NORM1, FOLD, CENTRED, EVEN_K, X_RUN, ROW_ALIGN, DZ_ALIGN, CHANNELS_FIRST,
            COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16, BLOCK_M, BLOCK_D, BLOCK_K,
            CHUNK, V_ROWS,
        )  # fmt: skip
        if norm1[1] is not None:  # dbias enters dW and db1: this split's slice of it
            offs_d = j * BLOCK_D + tl.arange(0, BLOCK_D)
            first, end = split_bounds(s, splits, n_parts)
            part = slice_sum(Partials + PART_DZ * n_parts * D, D, first, end, offs_d,
                             offs_d < D, ACC_DTYPE, SUM_ROWS)  # fmt: skip
            tl.store(SplitSums + (k * splits + s) * D + offs_d, part, mask=offs_d < D)
        if arrived_last(Counters + tile, splits):
            finish_tile(
                j, k, d_tiles, splits, GPart, SplitSums, Counters + tiles, W, stride_wd,
                w_strides, norm1, p_strides, DW, stride_dwd, dw_strides, dnorm1, DG1Part, K, D,
                C, PATCH, ACC_DTYPE, EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_D, BLOCK_K,
                FIN_D, SUM_ROWS,
            )  # fmt: skip


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
    DZ_SCALED: tl.constexpr,  # DZ holds Ẑ = dZ * rstd1: the pre-norm backward's rstd1 is in it
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
    grad_scale = rstd1  # the pre-norm backward's rstd1, unless dZ came with it
    if DZ_SCALED:
        grad_scale = tl.full(rstd1.shape, 1.0, rstd1.dtype)
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
            x_hat = normalize(x, mean1, rstd1, NORM1)
            dp = norm_bwd(g, x_hat, grad_scale, mean_g, mean_gx, NORM1)
            store_patches(DX, dx_strides, grad_off, m_mask, dp, k0, K, C, PATCH, CHANNELS_FIRST,
                          EMULATE_BF16, BLOCK_K)  # fmt: skip
