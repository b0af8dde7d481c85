"""Fused patch-embedding forward: gather patches -> norm1 -> x @ W.T + bias -> norm2 -> + pos
-> stem norm -> tokens, written after the prefix rows of their image (docs/design.md, "The op").

One program owns BLOCK_M tokens and every output column of them, so both norms over D see whole
rows without another launch. Rows that fit one BLOCK_N tile are finished in registers in the
projection pass; wider ones (TWO_PASS) are stored un-normalised and finished in place by one
more pass per norm over D. Every store goes through ``_store_rows``; the stem norm is applied
on the way by the epilogue, ``_store_tokens``. Output row m (image m // N, row m % N after the
prefix) holds the token of grid position m % N, or Keep's entry m (geometry.token_rows). The prefix
rows, the same in every image, are written by the launcher. Device code only: the launch module
allocates and builds the grid.
"""

import triton
import triton.language as tl

from .geometry import table_rows, token_offsets, token_rows
from .norms import NO_NORM, norm_apply, norm_merge, rstd_of, store_stats
from .patch_tiles import READ_BACK, add_pos, patch_stats, project_chunk
from .rounding import cast


@triton.jit
def _store_rows(Y, y_rows, t, offs_n, n_mask, m_mask, EMULATE_BF16: tl.constexpr):
    tl.store(y_rows[:, None] + offs_n[None, :], cast(t, Y.dtype.element_ty, EMULATE_BF16),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


@triton.jit
def _store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, rstd3, norm3,
                  NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):  # fmt: skip
    """The forward's epilogue, the one place finished tokens are stored: the stem norm of a
    chunk of T with its row statistics (NO_NORM: T itself), then the store."""
    y = norm_apply(t, mean3, rstd3, norm3, offs_n, n_mask, NORM3, ACC_DTYPE)
    _store_rows(Y, y_rows, y, offs_n, n_mask, m_mask, EMULATE_BF16)


@triton.jit
def _read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE: tl.constexpr):
    """A chunk of rows this program stored in an earlier pass (through L2, see READ_BACK)."""
    return tl.load(y_rows[:, None] + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                   other=0.0, cache_modifier=READ_BACK).to(ACC_DTYPE)  # fmt: skip


@triton.jit
def _tokens_chunk(z, mean2, rstd2, norm2, Pos, pos_rows, offs_n, n_mask, m_mask,
                  mean3, m3, n0, D, NORM2: tl.constexpr, NORM3: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """T = norm2(Z) + pos for one column chunk of Z, and the stem norm's row statistics
    merged over it."""
    t = norm_apply(z, mean2, rstd2, norm2, offs_n, n_mask, NORM2, ACC_DTYPE)
    t = add_pos(t, Pos, pos_rows, D, offs_n, m_mask[:, None] & n_mask[None, :], ACC_DTYPE)
    if NORM3 != NO_NORM:
        mean3, m3 = norm_merge(mean3, m3, t, n_mask, n0, D, NORM3, BLOCK_N)
    return t, mean3, m3


@triton.jit
def _patch_embed_fwd_kernel(
    X, stride_xb, x_strides,  # image (B, C, *spatial), any strides: batch, (c, *spatial)
    W, stride_wd, w_strides,  # projection: Linear (D, K) or conv (D, C, *patch), in place
    w_row_len,  # readable length of W's rows (>= K, zero-padded beyond it)
    Bias,  # (D,) or None
    norm1,  # (weight, bias) of the pre-norm (K,) in the K order; each may be None
    norm2,  # (weight, bias) of the post-norm (D,)
    Pos,  # (N, D) contiguous position table, or None
    Keep,  # (B, rows) int64 grid positions embedded per image, or None: every patch
    PosIndex,  # (B, rows) int64 table row of each token, or None: its grid position's
    norm3,  # (weight, bias) of the stem norm (D,)
    Y, y_strides,  # output tokens (B, N, D) with strides (b, n, d = 1): after the prefix rows
    Stats,  # (len(STAT_ROWS), M) in ACC_DTYPE, rows as kernels/norms.py names them
    M, K, D,
    rows,  # patch tokens per image in Y: N, or Keep's L
    grid,  # patches along each spatial dimension
    eps1, eps2, eps3,  # the epsilons of norm1, norm2 and the stem norm
    C: tl.constexpr,  # channels and patch size are compile-time: the patch-column index math
    PATCH: tl.constexpr,  # divides by them on every K step, and the gather vectorises only
    # when the compiler can see its contiguous runs
    NORM1: tl.constexpr,  # norm kinds (kernels/norms.py)
    NORM2: tl.constexpr,
    NORM3: tl.constexpr,
    Y_FLAT: tl.constexpr,  # no prefix rows: token m is row m of Y
    COMPUTE_DTYPE: tl.constexpr,  # GEMM operand dtype
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    ACC_DTYPE: tl.constexpr,  # accumulation / statistics dtype: fp32 (fp64 for fp64 inputs)
    EMULATE_BF16: tl.constexpr,  # interpreter: round bf16 by hand, multiply in ACC_DTYPE
    W_FLAT: tl.constexpr,  # W holds the patch axis contiguously in the K order
    CHANNELS_FIRST: tl.constexpr,  # K order (c, *patch), else (*patch, c): geometry.patch_cols
    TWO_PASS: tl.constexpr,  # a norm over rows wider than BLOCK_N: normalise afterwards
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    m_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_m, m_mask, row_off, position = token_rows(m_start, M, rows, grid, Keep, PATCH,
                                                   stride_xb, x_strides, BLOCK_M)  # fmt: skip
    pos_rows = table_rows(position, PosIndex, offs_m, m_mask)
    y_rows = Y + token_offsets(offs_m, rows, y_strides, Y_FLAT)
    mean1 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    rstd1 = tl.full([BLOCK_M], 1.0, dtype=ACC_DTYPE)
    if NORM1 != NO_NORM:
        mean1, rstd1 = patch_stats(
            X, x_strides, row_off, m_mask, K, C, PATCH, CHANNELS_FIRST, NORM1, eps1, ACC_DTYPE,
            BLOCK_M, BLOCK_K,
        )  # fmt: skip

    # 1. Z chunk by chunk, with the post-norm's row statistics merged across chunks. Rows of
    # one chunk are finished here; wider ones are stored as Z (post-norm) or T (stem norm
    # alone) for the passes below.
    mean2 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    mean3 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    m3 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for n0 in range(0, D, BLOCK_N):
        z, offs_n, n_mask = project_chunk(
            X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, Bias, norm1,
            mean1, rstd1, n0, K, D, C, PATCH, NORM1, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE,
            EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if NORM2 != NO_NORM:
            mean2, m2 = norm_merge(mean2, m2, z, n_mask, n0, D, NORM2, BLOCK_N)
        if TWO_PASS and NORM2 != NO_NORM:
            _store_rows(Y, y_rows, z, offs_n, n_mask, m_mask, EMULATE_BF16)
        else:
            # No post-norm, or the whole row is in registers: T now.
            t, mean3, m3 = _tokens_chunk(
                z, mean2, rstd_of(m2, D, eps2, NORM2), norm2, Pos, pos_rows, offs_n, n_mask,
                m_mask, mean3, m3, n0, D, NORM2, NORM3, ACC_DTYPE, BLOCK_N,
            )  # fmt: skip
            if TWO_PASS:
                _store_rows(Y, y_rows, t, offs_n, n_mask, m_mask, EMULATE_BF16)
            else:
                _store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3,
                              rstd_of(m3, D, eps3, NORM3), norm3, NORM3, ACC_DTYPE,
                              EMULATE_BF16)  # fmt: skip
    rstd2 = rstd_of(m2, D, eps2, NORM2)

    # 2. Wide rows with a post-norm: T = norm2(Z) + pos over the Z just written, with the
    # stem norm's statistics; finished here without a stem norm. The barrier orders this
    # program's stores before its loads.
    if TWO_PASS and NORM2 != NO_NORM:
        tl.debug_barrier()
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            z = _read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE)
            t, mean3, m3 = _tokens_chunk(
                z, mean2, rstd2, norm2, Pos, pos_rows, offs_n, n_mask, m_mask, mean3,
                m3, n0, D, NORM2, NORM3, ACC_DTYPE, BLOCK_N,
            )  # fmt: skip
            _store_rows(Y, y_rows, t, offs_n, n_mask, m_mask, EMULATE_BF16)
    rstd3 = rstd_of(m3, D, eps3, NORM3)

    # 3. Wide rows with a stem norm: the epilogue over the T just written.
    if TWO_PASS and NORM3 != NO_NORM:
        tl.debug_barrier()
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            t = _read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE)
            _store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, rstd3, norm3, NORM3,
                          ACC_DTYPE, EMULATE_BF16)  # fmt: skip

    store_stats(Stats, offs_m, m_mask, M, mean1, rstd1, mean2, rstd2, mean3, rstd3)
