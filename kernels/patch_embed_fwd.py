"""Fused patch-embedding forward: gather patches -> norm1 -> x @ W.T + bias -> norm2 -> + pos
-> stem norm -> tokens, written after the prefix rows of their image (docs/design.md, "The op").

One program owns BLOCK_M tokens and every output column of them, so both norms over D see whole
rows without another launch: rows that fit one BLOCK_N tile are finished in registers; wider
ones are stored and finished in place by one more pass per norm (TWO_PASS). The prefix rows,
the same in every image, are written by the launcher. Device code only: the launch module
allocates and builds the grid.
"""

import triton
import triton.language as tl

from .geometry import token_offsets, token_rows, tokens_per_image
from .norms import NO_NORM, chan_merge, norm_apply, rstd_of, store_stats
from .patch_tiles import READ_BACK, add_pos, patch_stats, project_chunk
from .rounding import cast


@triton.jit
def _store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, rstd3, norm3,
                  NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):  # fmt: skip
    """The forward's epilogue, the one place tokens are stored: the stem norm of a chunk of T
    with its row statistics (NO_NORM: T itself), then the store."""
    y = norm_apply(t, mean3, rstd3, norm3, offs_n, n_mask, NORM3, ACC_DTYPE)
    tl.store(y_rows[:, None] + offs_n[None, :], cast(y, Y.dtype.element_ty, EMULATE_BF16),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


@triton.jit
def _read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE: tl.constexpr):
    """A chunk of rows this program stored in an earlier pass (through L2, see READ_BACK)."""
    return tl.load(y_rows[:, None] + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                   other=0.0, cache_modifier=READ_BACK).to(ACC_DTYPE)  # fmt: skip


@triton.jit
def _patch_embed_fwd_kernel(
    X, stride_xb, x_strides,  # image (B, C, *spatial), any strides: batch, (c, *spatial)
    W, stride_wd, w_strides,  # projection: Linear (D, K) or conv (D, C, *patch), in place
    w_row_len,  # readable length of W's rows (>= K, zero-padded beyond it)
    Bias,  # (D,) or None
    norm1,  # (weight, bias) of the pre-norm (K,) in the K order; each may be None
    norm2,  # (weight, bias) of the post-norm (D,)
    Pos,  # (N, D) contiguous position table, or None
    norm3,  # (weight, bias) of the stem norm (D,)
    Y, y_strides,  # output tokens (B, N, D) with strides (b, n, d = 1): after the prefix rows
    Stats,  # (len(STAT_ROWS), M) in ACC_DTYPE, rows as kernels/norms.py names them
    M, K, D,
    grid,  # patches along each spatial dimension
    eps, stem_eps,
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
    offs_m, m_mask, row_off = token_rows(m_start, M, grid, PATCH, stride_xb, x_strides, BLOCK_M)
    per_image = tokens_per_image(grid)
    y_rows = Y + token_offsets(offs_m, per_image, y_strides, Y_FLAT)
    mean1 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    rstd1 = tl.full([BLOCK_M], 1.0, dtype=ACC_DTYPE)
    if NORM1 != NO_NORM:
        mean1, rstd1 = patch_stats(
            X, x_strides, row_off, m_mask, K, C, PATCH, CHANNELS_FIRST, eps, ACC_DTYPE, BLOCK_M,
            BLOCK_K,
        )  # fmt: skip

    # 1. Z chunk by chunk, with the row statistics of the first norm over D merged across
    # chunks: the post-norm's (of Z), else the stem norm's (of T = Z + pos).
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
        mask = m_mask[:, None] & n_mask[None, :]
        if NORM2 != NO_NORM:
            mean2, m2 = chan_merge(mean2, m2, z, n_mask, n0, D, BLOCK_N)
        if TWO_PASS:
            if NORM2 != NO_NORM:
                # Un-normalised Z, finished in place below (still in L2 then).
                _store_tokens(Y, y_rows, z, offs_n, n_mask, m_mask, mean3, m3, norm3, NO_NORM,
                              ACC_DTYPE, EMULATE_BF16)  # fmt: skip
            else:
                t = add_pos(z, Pos, offs_m, per_image, D, offs_n, mask, ACC_DTYPE)
                mean3, m3 = chan_merge(mean3, m3, t, n_mask, n0, D, BLOCK_N)
                _store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, m3, norm3, NO_NORM,
                              ACC_DTYPE, EMULATE_BF16)  # fmt: skip
        else:
            # The whole row is in registers (or there is no norm over D): finish it now.
            t = norm_apply(z, mean2, rstd_of(m2, D, eps), norm2, offs_n, n_mask, NORM2,
                           ACC_DTYPE)  # fmt: skip
            t = add_pos(t, Pos, offs_m, per_image, D, offs_n, mask, ACC_DTYPE)
            if NORM3 != NO_NORM:
                mean3, m3 = chan_merge(mean3, m3, t, n_mask, n0, D, BLOCK_N)
            _store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, rstd_of(m3, D, stem_eps),
                          norm3, NORM3, ACC_DTYPE, EMULATE_BF16)  # fmt: skip
    rstd2 = tl.full([BLOCK_M], 1.0, dtype=ACC_DTYPE)
    if NORM2 != NO_NORM:
        rstd2 = rstd_of(m2, D, eps)

    # 2. Rows wider than one tile with a post-norm: T = norm2(Z) + pos over the Z just
    # written, with the stem norm's statistics. The barrier orders this program's stores
    # before its loads.
    if TWO_PASS and NORM2 != NO_NORM:
        tl.debug_barrier()
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            z = _read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE)
            t = norm_apply(z, mean2, rstd2, norm2, offs_n, n_mask, NORM2, ACC_DTYPE)
            t = add_pos(t, Pos, offs_m, per_image, D, offs_n, m_mask[:, None] & n_mask[None, :],
                        ACC_DTYPE)  # fmt: skip
            if NORM3 != NO_NORM:
                mean3, m3 = chan_merge(mean3, m3, t, n_mask, n0, D, BLOCK_N)
            _store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, m3, norm3, NO_NORM,
                          ACC_DTYPE, EMULATE_BF16)  # fmt: skip
    rstd3 = tl.full([BLOCK_M], 1.0, dtype=ACC_DTYPE)
    if NORM3 != NO_NORM:
        rstd3 = rstd_of(m3, D, stem_eps)

    # 3. Rows wider than one tile with a stem norm: normalise the T just written.
    if TWO_PASS and NORM3 != NO_NORM:
        tl.debug_barrier()
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            t = _read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE)
            _store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, rstd3, norm3, NORM3,
                          ACC_DTYPE, EMULATE_BF16)  # fmt: skip

    store_stats(Stats, offs_m, m_mask, M, mean1, rstd1, mean2, rstd2, mean3, rstd3)
