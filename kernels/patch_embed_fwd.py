"""Fused patch-embedding forward (docs/design.md, "The op" and "Forward main loop"): gather
patches -> norm1 -> x @ W.T + bias -> norm2 -> + pos -> stem norm -> tokens, written after the
prefix rows of their image.

``_patch_embed_fwd_kernel``: program p owns the tokens of row block p // splits and the column
tiles of split p % splits (tiles_per_program of BLOCK_N columns each; splits is 1 unless the
grid would leave SMs idle). Per column tile:

1. the product of the raw patch tile and the folded weight, with the pre-norm's row statistics
   from the same tiles (projection.project_raw), and Z from it (projection.unfold_prenorm);
2. rows whose D columns fit the tile are finished in registers (epilogue.whole_rows); wider
   rows are stored and the statistics of their first norm over D merged
   (epilogue.partial_rows).

Then a program that owns every column of its rows finishes them (epilogue.finish_rows); where
several programs share a row block, each stores its partial row statistics and the rows are
finished by the last of them to arrive (RowCounters, zeroed by the call's fold kernel:
kernels/counters.py) or, with no earlier kernel in the call, by ``_finish_rows_kernel``.
Either way the statistics are merged in split order. Output row m (image m // rows) holds the
token of grid position m % rows, or Keep's entry m (geometry.token_rows). The prefix rows, the
same in every image, are written by the programs after the tokens' (kernels/prefix.py).
Device code only: the launch module allocates and builds the grids.
"""

import triton
import triton.language as tl

from .counters import arrived_last
from .epilogue import finish_rows, partial_rows, whole_rows
from .gather import READ_BACK
from .geometry import table_rows, token_offsets, token_positions, token_rows
from .norms import (
    LAYER_NORM,
    MEAN1,
    NO_NORM,
    RSTD1,
    rstd_of,
    stats_combine,
    store_row_norm_stats,
    store_stats,
)
from .prefix import prefix_rows
from .projection import SHIFT_RATIO, prenorm_stats, project_raw, unfold_prenorm

# Prefix rows per program (kernels/prefix.py).
PREFIX_ROWS = tl.constexpr(8)
# Rows of the partial row statistics (2, splits, M) that programs sharing a row block store.
PART_MEAN = tl.constexpr(0)
PART_M2 = tl.constexpr(1)


@triton.jit
def _finish_tile(acc, n0, n_first, mean1, rstd1, op_pivot, ColSum, Bias, m_mask, Y, y_rows,
                 norm2, Pos, pos_rows, norm3, D, eps2, eps3, mean_r, m2_r, NORM1: tl.constexpr,
                 NORM2: tl.constexpr, NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Z of the column tile n0 from its product, then whole rows finished (their statistics
    returned) or the tile stored for finish_rows (mean_r, m2_r merged over it)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    z = unfold_prenorm(acc, mean1 - op_pivot, rstd1, ColSum, Bias, offs_n, n_mask, NORM1,
                       ACC_DTYPE)  # fmt: skip
    zeros = tl.zeros(mean1.shape, dtype=ACC_DTYPE)
    ones = rstd_of(zeros, D, eps2, NO_NORM)
    mean2, rstd2, mean3, rstd3 = zeros, ones, zeros, ones
    if BLOCK_N >= D:
        mean2, rstd2, mean3, rstd3 = whole_rows(
            z, offs_n, n_mask, m_mask, Y, y_rows, norm2, Pos, pos_rows, norm3, D, eps2, eps3,
            NORM2, NORM3, ACC_DTYPE, EMULATE_BF16, BLOCK_N,
        )  # fmt: skip
    else:
        mean_r, m2_r = partial_rows(z, mean_r, m2_r, n0 - n_first, offs_n, n_mask, m_mask, Y,
                                    y_rows, Pos, pos_rows, D, NORM2, NORM3, ACC_DTYPE,
                                    EMULATE_BF16)  # fmt: skip
    return mean_r, m2_r, mean2, rstd2, mean3, rstd3


@triton.jit
def _finish_tiles(acc, acc_2, n0, n_first, n_end, mean1, rstd1, op_pivot, ColSum, Bias, m_mask,
                  Y, y_rows, norm2, Pos, pos_rows, norm3, D, eps2, eps3, mean_r, m2_r,
                  NORM1: tl.constexpr, NORM2: tl.constexpr, NORM3: tl.constexpr,
                  PAIR: tl.constexpr, ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    """_finish_tile of the column tile n0 and, with PAIR, of the next one (when the program's
    columns reach it)."""
    mean_r, m2_r, mean2, rstd2, mean3, rstd3 = _finish_tile(
        acc, n0, n_first, mean1, rstd1, op_pivot, ColSum, Bias, m_mask, Y, y_rows, norm2, Pos,
        pos_rows, norm3, D, eps2, eps3, mean_r, m2_r, NORM1, NORM2, NORM3, ACC_DTYPE,
        EMULATE_BF16, BLOCK_N,
    )  # fmt: skip
    if PAIR and n0 + BLOCK_N < n_end:
        mean_r, m2_r, mean2, rstd2, mean3, rstd3 = _finish_tile(
            acc_2, n0 + BLOCK_N, n_first, mean1, rstd1, op_pivot, ColSum, Bias, m_mask, Y,
            y_rows, norm2, Pos, pos_rows, norm3, D, eps2, eps3, mean_r, m2_r, NORM1, NORM2,
            NORM3, ACC_DTYPE, EMULATE_BF16, BLOCK_N,
        )  # fmt: skip
    return mean_r, m2_r, mean2, rstd2, mean3, rstd3


@triton.jit
def _column_tiles(n_start, n_first, n_end, mean1, rstd1, pivot, op_pivot, stats, X,
                  x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, ColSum, Bias,
                  Y, y_rows, norm2, Pos, pos_rows, norm3, K, D, eps2, eps3, C: tl.constexpr,
                  PATCH: tl.constexpr, NORM1: tl.constexpr, NORM2: tl.constexpr,
                  NORM3: tl.constexpr, SHIFT: tl.constexpr, EVEN_K: tl.constexpr,
                  PAIR: tl.constexpr, X_RUN: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, W_FLAT: tl.constexpr,
                  CHANNELS_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):  # fmt: skip
    """The column tiles (or pairs) n_start .. n_end of the program's rows: the product, then
    _finish_tiles. ``stats``: the statistics as _finish_tile returns them, so far; returns
    them updated."""
    mean_r, m2_r, mean2, rstd2, mean3, rstd3 = stats
    for n0 in range(n_start, n_end, BLOCK_N * (2 if PAIR else 1)):
        acc, acc_2, _s1, _s2 = project_raw(
            X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, pivot, n0, K, D,
            C, PATCH, False, SHIFT, EVEN_K, PAIR, X_RUN, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE,
            EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        mean_r, m2_r, mean2, rstd2, mean3, rstd3 = _finish_tiles(
            acc, acc_2, n0, n_first, n_end, mean1, rstd1, op_pivot, ColSum, Bias, m_mask, Y,
            y_rows, norm2, Pos, pos_rows, norm3, D, eps2, eps3, mean_r, m2_r, NORM1, NORM2,
            NORM3, PAIR, ACC_DTYPE, EMULATE_BF16, BLOCK_N,
        )  # fmt: skip
        # Keeps the next tile's zeroed accumulator out of this tile's wgmma pipeline: with
        # Triton 3.6 a short epilogue (no norm) lets them overlap, and ptxas then serialises
        # every wgmma of the kernel (C7515).
        tl.debug_barrier()
    return mean_r, m2_r, mean2, rstd2, mean3, rstd3


@triton.jit
def _first_and_column_tiles(acc, acc_2, n_first, n_end, mean1, rstd1, pivot, op_pivot, stats,
                            X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len,
                            ColSum, Bias, Y, y_rows, norm2, Pos, pos_rows, norm3, K, D, eps2,
                            eps3, C: tl.constexpr, PATCH: tl.constexpr, NORM1: tl.constexpr,
                            NORM2: tl.constexpr, NORM3: tl.constexpr, SHIFT: tl.constexpr,
                            EVEN_K: tl.constexpr, PAIR: tl.constexpr, X_RUN: tl.constexpr,
                            COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                            W_FLAT: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):  # fmt: skip
    """The first column tile (or pair) from the products already made (acc, acc_2), then the
    program's other column tiles."""
    mean_r, m2_r, _mean2, _rstd2, _mean3, _rstd3 = stats
    stats = _finish_tiles(
        acc, acc_2, n_first, n_first, n_end, mean1, rstd1, op_pivot, ColSum, Bias, m_mask, Y,
        y_rows, norm2, Pos, pos_rows, norm3, D, eps2, eps3, mean_r, m2_r, NORM1, NORM2, NORM3,
        PAIR, ACC_DTYPE, EMULATE_BF16, BLOCK_N,
    )  # fmt: skip
    return _column_tiles(
        n_first + BLOCK_N * (2 if PAIR else 1), n_first, n_end, mean1, rstd1, pivot, op_pivot,
        stats, X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, ColSum, Bias,
        Y, y_rows, norm2, Pos, pos_rows, norm3, K, D, eps2, eps3, C, PATCH, NORM1, NORM2, NORM3,
        SHIFT, EVEN_K, PAIR, X_RUN, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16,
        W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _patch_embed_fwd_kernel(
    X, stride_xb, x_strides,  # image (B, C, *spatial), any strides: batch, (c, *spatial)
    W, stride_wd, w_strides,  # projection: W' from kernels/fold.py, or the Linear / conv weight
    w_row_len,  # readable length of W's rows (>= K, zero-padded beyond it)
    ColSum,  # (D,) row sums of W' (a LayerNorm pre-norm), or None
    Bias,  # (D,): b' from kernels/fold.py, or the bias, or None
    norm2,  # (weight, bias) of the post-norm (D,); either None
    Pos,  # (N, D) contiguous position table, or None
    Keep,  # (B, rows) int64 grid positions embedded per image, or None: every patch
    PosIndex,  # (B, rows) int64 table row of each token, or None: its grid position's
    norm3,  # (weight, bias) of the stem norm (D,)
    Prefix, P,  # (P, D) contiguous rows before every image's tokens, or None; P
    Y, y_strides,  # output tokens (B, rows, D) with strides (b, n, d = 1): after the prefix rows
    Stats,  # (len(STAT_ROWS), M) in ACC_DTYPE, rows as kernels/norms.py names them; None:
    # not kept (no backward will read them)
    RowParts,  # (2, splits, M) ACC_DTYPE partial row statistics (SHARED_ROWS), or None
    RowCounters,  # (row blocks,) int32 zeroed: the last program of a row block finishes it
    # (SHARED_ROWS); None: _finish_rows_kernel does
    M, K, D,
    rows,  # patch tokens per image in Y: N, or Keep's L
    grid,  # patches along each spatial dimension
    splits,  # programs per row block
    tiles_per_program,  # column tiles of BLOCK_N per program
    eps1, eps2, eps3,  # the epsilons of norm1, norm2 and the stem norm
    C: tl.constexpr,  # channels and patch size are compile-time: the patch-column index math
    PATCH: tl.constexpr,  # divides by them on every K step, and the gather vectorises only
    # when the compiler can see its contiguous runs
    NORM1: tl.constexpr,  # norm kinds (kernels/norms.py)
    NORM2: tl.constexpr,
    NORM3: tl.constexpr,
    Y_FLAT: tl.constexpr,  # no prefix rows: token m is row m of Y
    SHIFT: tl.constexpr,  # patches not exact in COMPUTE_DTYPE: shifted by a pivot (projection)
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K
    PAIR: tl.constexpr,  # column tiles two at a time from the same patch tiles (projection)
    X_RUN: tl.constexpr,  # contiguous runs of the image's patch elements (projection)
    SHARED_ROWS: tl.constexpr,  # splits > 1 with a norm over D: rows finished by the last
    # program of their block to arrive, or by _finish_rows_kernel
    COMPUTE_DTYPE: tl.constexpr,  # GEMM operand dtype
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    ACC_DTYPE: tl.constexpr,  # accumulation / statistics dtype: fp32 (fp64 for fp64 inputs)
    EMULATE_BF16: tl.constexpr,  # interpreter: round bf16 by hand, multiply in ACC_DTYPE
    W_FLAT: tl.constexpr,  # W holds the patch axis contiguously in the K order
    CHANNELS_FIRST: tl.constexpr,  # K order (c, *patch), else (*patch, c): geometry.patch_cols
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWEEP_N: tl.constexpr,  # columns per step of finish_rows' passes (fewer registers)
):  # fmt: skip
    pid = tl.program_id(0)
    if Prefix is not None:  # the programs after the tokens' write the prefix rows
        token_programs = tl.cdiv(M, BLOCK_M) * splits
        if pid >= token_programs:
            prefix_rows((pid - token_programs) * PREFIX_ROWS, Prefix, P, Y, y_strides,
                        M // rows, D, norm3, eps3, NORM3, ACC_DTYPE, EMULATE_BF16, PREFIX_ROWS,
                        SWEEP_N)  # fmt: skip
            return
    split = pid % splits
    m_start = (pid // splits).to(tl.int64) * BLOCK_M
    offs_m, m_mask, row_off, position = token_rows(m_start, M, rows, grid, Keep, PATCH,
                                                   stride_xb, x_strides, BLOCK_M)  # fmt: skip
    pos_rows = table_rows(position, PosIndex, offs_m, m_mask)
    y_rows = Y + token_offsets(offs_m, rows, y_strides, Y_FLAT)
    zeros = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    pivot = zeros
    if NORM1 == LAYER_NORM:  # any value of the patch keeps p - pivot small: its first
        pivot = tl.load(X + row_off, mask=m_mask, other=0.0).to(ACC_DTYPE)
    n_first = split * tiles_per_program * BLOCK_N
    n_end = tl.minimum(n_first + tiles_per_program * BLOCK_N, D)
    # The first column tile (or pair) also takes the pre-norm's statistics, from the tiles it
    # loads.
    acc, acc_2, sum1, sum2 = project_raw(
        X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, pivot, n_first, K,
        D, C, PATCH, NORM1 != NO_NORM, SHIFT, EVEN_K, PAIR, X_RUN, COMPUTE_DTYPE, DOT_PRECISION,
        ACC_DTYPE, EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    mean1, rstd1 = prenorm_stats(sum1, sum2, pivot, K, eps1, NORM1)
    # Each path below consumes its own products: an accumulator merged from two branches makes
    # ptxas serialise every wgmma of the kernel, so the fallback's branch exists only where it
    # can be taken.
    zero_stats = (zeros, zeros, zeros, rstd1 * 0 + 1, zeros, rstd1 * 0 + 1)
    if not SHIFT and NORM1 == LAYER_NORM:
        # Rows that are (nearly) constant at a large |mean|: mean * s would cancel most of an
        # fp32 sum of exact products and rstd magnify what is left. Such row blocks take the
        # shifted operand (the loop of inexact inputs) for every column tile.
        if tl.max(tl.abs(mean1) * rstd1, axis=0) > SHIFT_RATIO:
            stats = _column_tiles(
                n_first, n_first, n_end, mean1, rstd1, pivot, pivot, zero_stats, X, x_strides,
                row_off, m_mask, W, stride_wd, w_strides, w_row_len, ColSum, Bias, Y, y_rows,
                norm2, Pos, pos_rows, norm3, K, D, eps2, eps3, C, PATCH, NORM1, NORM2, NORM3,
                True, EVEN_K, PAIR, X_RUN, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16,
                W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        else:
            stats = _first_and_column_tiles(
                acc, acc_2, n_first, n_end, mean1, rstd1, pivot, zeros, zero_stats, X,
                x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, ColSum, Bias, Y,
                y_rows, norm2, Pos, pos_rows, norm3, K, D, eps2, eps3, C, PATCH, NORM1, NORM2,
                NORM3, False, EVEN_K, PAIR, X_RUN, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE,
                EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    else:
        stats = _first_and_column_tiles(
            acc, acc_2, n_first, n_end, mean1, rstd1, pivot, pivot if SHIFT else zeros,
            zero_stats, X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len,
            ColSum, Bias, Y, y_rows, norm2, Pos, pos_rows, norm3, K, D, eps2, eps3, C, PATCH,
            NORM1, NORM2, NORM3, SHIFT, EVEN_K, PAIR, X_RUN, COMPUTE_DTYPE, DOT_PRECISION,
            ACC_DTYPE, EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    # mean_r, m2_r: the first norm over D, over this program's columns (epilogue.partial_rows)
    mean_r, m2_r, mean2, rstd2, mean3, rstd3 = stats

    row_norm = NORM2 != NO_NORM or NORM3 != NO_NORM
    if SHARED_ROWS:
        parts = RowParts + split * M + offs_m
        tl.store(parts + PART_MEAN * splits * M, mean_r, mask=m_mask)
        tl.store(parts + PART_M2 * splits * M, m2_r, mask=m_mask)
        if Stats is not None and split == 0:  # the other rows are the finisher's
            tl.store(Stats + MEAN1 * M + offs_m, mean1, mask=m_mask)
            tl.store(Stats + RSTD1 * M + offs_m, rstd1, mask=m_mask)
        if RowCounters is not None:
            if arrived_last(RowCounters + pid // splits, splits):
                _finish_shared_rows(
                    offs_m, m_mask, Y, y_rows, pos_rows, RowParts, Stats, norm2, Pos, norm3, M, D,
                    splits, tiles_per_program * BLOCK_N, eps2, eps3, NORM2, NORM3, ACC_DTYPE,
                    EMULATE_BF16, SWEEP_N,
                )  # fmt: skip
    else:
        if BLOCK_N < D and row_norm:
            mean2, rstd2, mean3, rstd3 = finish_rows(
                Y, y_rows, m_mask, mean_r, m2_r, norm2, Pos, pos_rows, norm3, D, eps2, eps3,
                NORM2, NORM3, ACC_DTYPE, EMULATE_BF16, SWEEP_N,
            )  # fmt: skip
        if Stats is not None and split == 0:
            store_stats(Stats, offs_m, m_mask, M, mean1, rstd1, mean2, rstd2, mean3, rstd3)


@triton.jit
def _finish_shared_rows(offs_m, m_mask, Y, y_rows, pos_rows, RowParts, Stats, norm2, Pos, norm3,
                        M, D, splits, cols_per_split, eps2, eps3, NORM2: tl.constexpr,
                        NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
                        EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Rows that several programs of _patch_embed_fwd_kernel share, finished: their partial
    statistics merged in split order (the same bits whoever finishes), then
    epilogue.finish_rows. The parts and rows are read through L2: other programs stored them."""
    mean_r = tl.zeros(offs_m.shape, dtype=ACC_DTYPE)
    m2_r = tl.zeros(offs_m.shape, dtype=ACC_DTYPE)
    for s in range(0, splits):
        parts = RowParts + s * M + offs_m
        mean_s = tl.load(parts + PART_MEAN * splits * M, mask=m_mask, other=0.0,
                         cache_modifier=READ_BACK)  # fmt: skip
        m2_s = tl.load(parts + PART_M2 * splits * M, mask=m_mask, other=0.0,
                       cache_modifier=READ_BACK)  # fmt: skip
        seen = s * cols_per_split
        count = tl.minimum(cols_per_split, D - seen)
        if NORM2 != NO_NORM:
            mean_r, m2_r = stats_combine(mean_r, m2_r, seen, mean_s, m2_s, count, NORM2)
        else:
            mean_r, m2_r = stats_combine(mean_r, m2_r, seen, mean_s, m2_s, count, NORM3)
    mean2, rstd2, mean3, rstd3 = finish_rows(
        Y, y_rows, m_mask, mean_r, m2_r, norm2, Pos, pos_rows, norm3, D, eps2, eps3,
        NORM2, NORM3, ACC_DTYPE, EMULATE_BF16, BLOCK_N,
    )  # fmt: skip
    if Stats is not None:
        store_row_norm_stats(Stats, offs_m, m_mask, M, mean2, rstd2, mean3, rstd3)


@triton.jit
def _finish_rows_kernel(
    Y, y_strides,  # tokens (B, rows, D) as _patch_embed_fwd_kernel stored them
    RowParts,  # (2, splits, M) its programs' partial row statistics
    Stats,  # (len(STAT_ROWS), M): the rows of the norms over D are written here, or None
    norm2, Pos, Keep, PosIndex, norm3,  # as _patch_embed_fwd_kernel's
    M, D, rows, splits,
    cols_per_split,  # columns per program of _patch_embed_fwd_kernel
    eps2, eps3,
    NORM2: tl.constexpr, NORM3: tl.constexpr, Y_FLAT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The shared rows of a call with no kernel before the main one to zero its RowCounters."""
    m_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    _tok, offs_m, m_mask, position = token_positions(m_start, M, rows, Keep, BLOCK_M)
    pos_rows = table_rows(position, PosIndex, offs_m, m_mask)
    y_rows = Y + token_offsets(offs_m, rows, y_strides, Y_FLAT)
    _finish_shared_rows(offs_m, m_mask, Y, y_rows, pos_rows, RowParts, Stats, norm2, Pos, norm3,
                        M, D, splits, cols_per_split, eps2, eps3, NORM2, NORM3, ACC_DTYPE,
                        EMULATE_BF16, BLOCK_N)  # fmt: skip
