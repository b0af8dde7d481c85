"""The forward's epilogue (docs/design.md, "Forward epilogue"): from Z to the stored tokens,

    T = norm2(Z) + pos,   Y = norm3(T)

both norms over D (whole output rows). Pure @triton.jit functions, no launches.

Rows that fit one column tile are finished in registers (:func:`whole_rows`). Wider rows are
stored tile by tile (:func:`partial_rows`: Z with a post-norm, T with a stem norm alone, else
the tokens themselves) while the row statistics of the first norm over D are merged, and are
then finished by :func:`finish_rows`, which reads them back (through L2) once per norm: by the
program that stored them, or by a second kernel when several programs share a row block.
"""

import triton
import triton.language as tl

from .gather import READ_BACK
from .norms import NO_NORM, norm_apply, norm_merge, rstd_of
from .rounding import cast


@triton.jit
def add_pos(t, Pos, pos_rows, D, offs_n, mask, ACC_DTYPE: tl.constexpr):
    """t + the rows pos_rows (geometry.table_rows) of the position table (None: t) for a
    tile's tokens."""
    if Pos is not None:
        rows = pos_rows.to(tl.int64) * D
        t += tl.load(Pos + rows[:, None] + offs_n[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    return t


@triton.jit
def store_rows(Y, y_rows, t, offs_n, n_mask, m_mask, EMULATE_BF16: tl.constexpr):
    tl.store(y_rows[:, None] + offs_n[None, :], cast(t, Y.dtype.element_ty, EMULATE_BF16),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


@triton.jit
def store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, rstd3, norm3,
                 NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 EMULATE_BF16: tl.constexpr):  # fmt: skip
    """The one place finished tokens are stored: the stem norm of a chunk of T with its row
    statistics (NO_NORM: T itself), then the store."""
    y = norm_apply(t, mean3, rstd3, norm3, offs_n, n_mask, NORM3, ACC_DTYPE)
    store_rows(Y, y_rows, y, offs_n, n_mask, m_mask, EMULATE_BF16)


@triton.jit
def read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE: tl.constexpr):
    """A chunk of rows stored by an earlier pass (through L2, see gather.READ_BACK)."""
    return tl.load(y_rows[:, None] + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                   other=0.0, cache_modifier=READ_BACK).to(ACC_DTYPE)  # fmt: skip


@triton.jit
def tokens_chunk(z, mean2, rstd2, norm2, Pos, pos_rows, offs_n, n_mask, m_mask, mean3, m3, n0,
                 D, NORM2: tl.constexpr, NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """T = norm2(Z) + pos for one column chunk n0 .. n0 + BLOCK_N of Z, and the stem norm's
    row statistics merged over it."""
    t = norm_apply(z, mean2, rstd2, norm2, offs_n, n_mask, NORM2, ACC_DTYPE)
    t = add_pos(t, Pos, pos_rows, D, offs_n, m_mask[:, None] & n_mask[None, :], ACC_DTYPE)
    if NORM3 != NO_NORM:
        mean3, m3 = norm_merge(mean3, m3, t, n_mask, n0, tl.minimum(D - n0, BLOCK_N), NORM3)
    return t, mean3, m3


@triton.jit
def whole_rows(z, offs_n, n_mask, m_mask, Y, y_rows, norm2, Pos, pos_rows, norm3, D, eps2, eps3,
               NORM2: tl.constexpr, NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
               EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Rows whose D columns all lie in the tile z: the tokens, finished in registers and
    stored. Returns the row statistics (mean2, rstd2, mean3, rstd3), each norm's exact
    two-pass ones (mean, then the centred sum of squares)."""
    zeros = tl.zeros(z.shape[:1], dtype=ACC_DTYPE)
    mean2, m2 = zeros, zeros
    if NORM2 != NO_NORM:
        mean2, m2 = norm_merge(mean2, m2, z, n_mask, 0, D, NORM2)
    rstd2 = rstd_of(m2, D, eps2, NORM2)
    t, mean3, m3 = tokens_chunk(z, mean2, rstd2, norm2, Pos, pos_rows, offs_n, n_mask, m_mask,
                                zeros, zeros, 0, D, NORM2, NORM3, ACC_DTYPE, BLOCK_N)  # fmt: skip
    rstd3 = rstd_of(m3, D, eps3, NORM3)
    store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, rstd3, norm3, NORM3, ACC_DTYPE,
                 EMULATE_BF16)  # fmt: skip
    return mean2, rstd2, mean3, rstd3


@triton.jit
def partial_rows(z, mean_r, m2_r, n_seen, offs_n, n_mask, m_mask, Y, y_rows, Pos, pos_rows, D,
                 NORM2: tl.constexpr, NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 EMULATE_BF16: tl.constexpr):  # fmt: skip
    """One column tile of rows wider than a tile, stored for finish_rows: Z with a post-norm,
    T = Z + pos with a stem norm alone, the tokens without a norm over D. Returns the row
    statistics of the first norm over D (of what is stored), merged with those of the n_seen
    columns before this tile."""
    count = tl.sum(n_mask.to(tl.int32), axis=0)
    if NORM2 != NO_NORM:
        mean_r, m2_r = norm_merge(mean_r, m2_r, z, n_mask, n_seen, count, NORM2)
    else:
        z = add_pos(z, Pos, pos_rows, D, offs_n, m_mask[:, None] & n_mask[None, :], ACC_DTYPE)
        if NORM3 != NO_NORM:
            mean_r, m2_r = norm_merge(mean_r, m2_r, z, n_mask, n_seen, count, NORM3)
    store_rows(Y, y_rows, z, offs_n, n_mask, m_mask, EMULATE_BF16)
    return mean_r, m2_r


@triton.jit
def finish_rows(Y, y_rows, m_mask, mean_r, m2_r, norm2, Pos, pos_rows, norm3, D, eps2, eps3,
                NORM2: tl.constexpr, NORM3: tl.constexpr, ACC_DTYPE: tl.constexpr,
                EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Rows that partial_rows stored, with the merged statistics (mean_r, m2_r) of their first
    norm over D: with a post-norm, T = norm2(Z) + pos over the stored Z and the stem norm's
    statistics of T; then, with a stem norm, the tokens over the stored T. Returns the row
    statistics (mean2, rstd2, mean3, rstd3). The barriers order this program's earlier stores
    before its loads."""
    zeros = tl.zeros(mean_r.shape, dtype=ACC_DTYPE)
    mean2, rstd2 = zeros, rstd_of(zeros, D, eps2, NO_NORM)
    mean3, m3 = mean_r, m2_r
    if NORM2 != NO_NORM:
        mean2, rstd2 = mean_r, rstd_of(m2_r, D, eps2, NORM2)
        mean3, m3 = zeros, zeros
        tl.debug_barrier()
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            z = read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE)
            t, mean3, m3 = tokens_chunk(z, mean2, rstd2, norm2, Pos, pos_rows, offs_n, n_mask,
                                        m_mask, mean3, m3, n0, D, NORM2, NORM3, ACC_DTYPE,
                                        BLOCK_N)  # fmt: skip
            store_rows(Y, y_rows, t, offs_n, n_mask, m_mask, EMULATE_BF16)
    rstd3 = rstd_of(m3, D, eps3, NORM3)
    if NORM3 != NO_NORM:
        tl.debug_barrier()
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < D
            t = read_back(y_rows, offs_n, n_mask, m_mask, ACC_DTYPE)
            store_tokens(Y, y_rows, t, offs_n, n_mask, m_mask, mean3, rstd3, norm3, NORM3,
                         ACC_DTYPE, EMULATE_BF16)  # fmt: skip
    else:
        mean3 = zeros
    return mean2, rstd2, mean3, rstd3
