"""Fused patch-embedding backward, first kernel (docs/design.md, "Backward"): the upstream
gradient of the patch tokens back through the stem norm, the position table and the post-norm
to dZ, per token tile, with per-program column partials for every vector gradient over D.

    dT = rstd3 * (g3 - mean(g3) - t̂ * mean(g3 * t̂)),  g3 = dY * g3w   (dY without stem norm)
    dZ = rstd2 * (g2 - mean(g2) - ẑ * mean(g2 * ẑ)),  g2 = dT * g2w   (dT without post-norm)

(an RMSNorm has no mean(g) term). Passes over D, one helper each:

1. ``_pass_normalised``: Z recomputed with the forward's projection chunk; the DZ buffer keeps
   its normalised rows (ẑ with a post-norm, else t̂) for the later passes, each program reading
   back what it wrote; the row sums of the last norm's backward (dY is its upstream gradient).
2. ``_pass_post_sums``, both norms over D: dT, and the row sums of the post-norm's backward.
3. ``_pass_dz``: dZ (dT recomputed rather than stored), over what DZ kept.

Without a norm over D, dZ is dY itself (``_pass_dy``). t̂ = norm3(affine2(ẑ) + pos) is
recomputed from ẑ where needed. What the dW GEMM reads is stored by ``_store_dz``: dZ, or with
DZ_SCALED the pre-norm's rstd folded in (Ẑ = dZ * rstd1, kernels/patch_embed_bwd_dw.py) with,
for a LayerNorm, the sums of Ẑ * mean1 over each group of V_ROWS tokens and a flag per group
whose tokens the fold would cancel on. The kernel also stores each token's image offset
(XRowOff) so that the dW GEMM, which visits token tiles in a strided order, does not divide by
the image geometry on every step.

Programs are persistent (program p takes the token tiles p, p + programs, ...) and add each
tile's column sums into their own row of the partials: few rows for the fixed-order second
stage in the dW kernel. Program 0 also zeroes the dW kernel's counters; with prefix rows, one
more program makes their gradients (kernels/prefix.py). Device code only.
"""

import triton
import triton.language as tl

from .column_partials import PART_DB2, PART_DB3, PART_DG2, PART_DG3, PART_DZ, add_partial
from .counters import zero
from .epilogue import add_pos
from .gather import READ_BACK
from .geometry import table_rows, token_offsets, token_rows
from .norms import (
    LAYER_NORM,
    MEAN1,
    MEAN2,
    MEAN3,
    NO_NORM,
    RSTD1,
    RSTD2,
    RSTD3,
    affine,
    load_stat,
    norm_bwd,
    norm_bwd_sums,
    normalize,
    scale_cols,
)
from .prefix import prefix_grads
from .projection import fold_unfit, project_chunk
from .rounding import cast


@triton.jit
def _stem_input_hat(z_hat, pos_rows, offs_n, n_mask, mask, norm2, Pos, D, mean3, rstd3,
                    NORM2: tl.constexpr, NORM3: tl.constexpr,
                    ACC_DTYPE: tl.constexpr):  # fmt: skip
    """t̂ of the stem norm from ẑ (Z itself without a post-norm): T = norm2's affine(ẑ) + pos."""
    t = z_hat
    if NORM2 != NO_NORM:
        t = affine(z_hat, norm2, offs_n, n_mask, ACC_DTYPE)
    t = add_pos(t, Pos, pos_rows, D, offs_n, mask, ACC_DTYPE)
    return tl.where(mask, normalize(t, mean3, rstd3, NORM3), 0.0)


@triton.jit
def _grad_t(dy, t_hat, norm3, offs_n, n_mask, rstd3, mean_g3, mean_gt3, NORM3: tl.constexpr,
            ACC_DTYPE: tl.constexpr):  # fmt: skip
    """dT, the gradient of the stem norm's input (dY itself without a stem norm)."""
    if NORM3 != NO_NORM:
        g = scale_cols(dy, norm3[0], offs_n, n_mask, ACC_DTYPE)
        dy = norm_bwd(g, t_hat, rstd3, mean_g3, mean_gt3, NORM3)
    return dy


@triton.jit
def _norm_bwd_chunk(sum_g, sum_gt, up, t_hat, params, part, ROW_W: tl.constexpr,
                    ROW_B: tl.constexpr, offs_n, n_mask, ACC_DTYPE: tl.constexpr):  # fmt: skip
    """One column chunk of a norm's backward, upstream gradient ``up``: the row sums of
    g = up * weight and g * t̂ so far, and this tile's column sums up * t̂ (-> dweight) and up
    (-> dbias) added into rows ROW_W, ROW_B of the partials, where those parameters exist."""
    g = scale_cols(up, params[0], offs_n, n_mask, ACC_DTYPE)
    sum_g, sum_gt = norm_bwd_sums(sum_g, sum_gt, g, t_hat)
    if params[0] is not None:
        add_partial(part, ROW_W, offs_n, n_mask, tl.sum(up * t_hat, axis=0))
    if params[1] is not None:
        add_partial(part, ROW_B, offs_n, n_mask, tl.sum(up, axis=0))
    return sum_g, sum_gt


@triton.jit
def _read_chunk(dz_rows, dy_rows, dy_strides, n0, m_mask, D, ACC_DTYPE: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    """Columns n0 .. n0 + BLOCK_N of a later pass: the normalised rows DZ keeps (read back by
    the program that wrote them) and dY, with their indices and masks."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    mask = m_mask[:, None] & n_mask[None, :]
    kept_hat = tl.load(dz_rows + offs_n[None, :], mask=mask, other=0.0,
                       cache_modifier=READ_BACK).to(ACC_DTYPE)  # fmt: skip
    dy = tl.load(dy_rows[:, None] + offs_n[None, :] * dy_strides[2], mask=mask,
                 other=0.0).to(ACC_DTYPE)  # fmt: skip
    return kept_hat, dy, offs_n, n_mask, mask


@triton.jit
def _pass_normalised(X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, Bias,
                     norm1, mean1, rstd1, norm2, mean2, rstd2, Pos, pos_rows, norm3, mean3,
                     rstd3, dy_rows, dy_strides, dz_rows, part, K, D,
                     C: tl.constexpr, PATCH: tl.constexpr, NORM1: tl.constexpr,
                     NORM2: tl.constexpr, NORM3: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                     EMULATE_BF16: tl.constexpr, W_FLAT: tl.constexpr,
                     CHANNELS_FIRST: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Pass 1: Z recomputed chunk by chunk, its normalised rows kept in DZ (ẑ, or t̂ with the
    stem norm alone), and the row sums of the last norm's backward, whose upstream gradient is
    dY: the stem norm's if there is one, else the post-norm's."""
    sum_g = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    sum_gt = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for n0 in range(0, D, BLOCK_N):
        z, offs_n, n_mask = project_chunk(
            X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, Bias, norm1,
            mean1, rstd1, n0, K, D, C, PATCH, NORM1, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE,
            EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        mask = m_mask[:, None] & n_mask[None, :]
        dy = tl.load(dy_rows[:, None] + offs_n[None, :] * dy_strides[2], mask=mask,
                     other=0.0).to(ACC_DTYPE)  # fmt: skip
        kept_hat = z
        if NORM2 != NO_NORM:
            kept_hat = tl.where(mask, normalize(z, mean2, rstd2, NORM2), 0.0)
        if NORM3 != NO_NORM:
            t_hat = _stem_input_hat(kept_hat, pos_rows, offs_n, n_mask, mask, norm2, Pos, D,
                                    mean3, rstd3, NORM2, NORM3, ACC_DTYPE)  # fmt: skip
            sum_g, sum_gt = _norm_bwd_chunk(sum_g, sum_gt, dy, t_hat, norm3, part, PART_DG3,
                                            PART_DB3, offs_n, n_mask, ACC_DTYPE)  # fmt: skip
            if NORM2 == NO_NORM:
                kept_hat = t_hat
        else:
            sum_g, sum_gt = _norm_bwd_chunk(sum_g, sum_gt, dy, kept_hat, norm2, part, PART_DG2,
                                            PART_DB2, offs_n, n_mask, ACC_DTYPE)  # fmt: skip
        tl.store(dz_rows + offs_n[None, :], cast(kept_hat, COMPUTE_DTYPE, EMULATE_BF16),
                 mask=mask)  # fmt: skip
    return sum_g / D, sum_gt / D


@triton.jit
def _pass_post_sums(dz_rows, dy_rows, dy_strides, offs_m, m_mask, pos_rows, norm2, Pos, norm3,
                    mean3, rstd3, mean_g3, mean_gt3, DT, part, D,
                    NORM2: tl.constexpr, NORM3: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Pass 2, both norms over D: dT from ẑ and dY (stored in DT for the position table's
    gradient when there is one), and the row sums of the post-norm's backward."""
    sum_g = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    sum_gz = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for n0 in range(0, D, BLOCK_N):
        z_hat, dy, offs_n, n_mask, mask = _read_chunk(dz_rows, dy_rows, dy_strides, n0, m_mask,
                                                      D, ACC_DTYPE, BLOCK_N)  # fmt: skip
        t_hat = _stem_input_hat(z_hat, pos_rows, offs_n, n_mask, mask, norm2, Pos, D, mean3,
                                rstd3, NORM2, NORM3, ACC_DTYPE)  # fmt: skip
        dt = tl.where(mask, _grad_t(dy, t_hat, norm3, offs_n, n_mask, rstd3, mean_g3, mean_gt3,
                                    NORM3, ACC_DTYPE), 0.0)  # fmt: skip
        if DT is not None:
            tl.store(DT + offs_m[:, None] * D + offs_n[None, :],
                     cast(dt, COMPUTE_DTYPE, EMULATE_BF16), mask=mask)  # fmt: skip
        sum_g, sum_gz = _norm_bwd_chunk(sum_g, sum_gz, dt, z_hat, norm2, part, PART_DG2,
                                        PART_DB2, offs_n, n_mask, ACC_DTYPE)  # fmt: skip
    return sum_g / D, sum_gz / D


@triton.jit
def _store_dz(dz, offs_n, n_mask, mask, part, dz_rows, dt_rows, v_rows, rstd1, centre_mean,
              DZ_SCALED: tl.constexpr, CENTRED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
              ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
              V_ROWS: tl.constexpr):  # fmt: skip
    """dZ of a column chunk (ACC_DTYPE, zero outside the tile): its column sums (-> dbias)
    added into the partials, dT = dZ where the table's gradient reads it (dt_rows, else None),
    and the dW GEMM's operand into DZ: dZ, or with DZ_SCALED Ẑ = dZ * rstd1 rounded to the
    operand dtype and, CENTRED, the column sums of Ẑ * mean1 over each group of V_ROWS tokens
    (v_rows: the group's rows of the centring sums; centre_mean: mean1, 0 for the tokens the
    fold leaves out), from the rounded values the GEMM reads."""
    add_partial(part, PART_DZ, offs_n, n_mask, tl.sum(dz, axis=0))
    if dt_rows is not None:
        tl.store(dt_rows + offs_n[None, :], cast(dz, COMPUTE_DTYPE, EMULATE_BF16), mask=mask)
    if DZ_SCALED:
        dz = dz * rstd1[:, None]
    operand = cast(dz, COMPUTE_DTYPE, EMULATE_BF16)
    tl.store(dz_rows + offs_n[None, :], operand, mask=mask)
    if CENTRED:
        centre = operand.to(ACC_DTYPE) * centre_mean[:, None]
        centre = tl.reshape(centre, (BLOCK_M // V_ROWS, V_ROWS, centre.shape[1]))
        tl.store(v_rows[:, None] + offs_n[None, :], tl.sum(centre, axis=1), mask=n_mask[None, :])


@triton.jit
def _pass_dz(dz_rows, dt_rows, v_rows, dy_rows, dy_strides, m_mask, pos_rows, norm2, rstd2,
             mean_g2, mean_gz2, Pos, norm3, mean3, rstd3, mean_g3, mean_gt3, part, centre_mean,
             rstd1, D, NORM2: tl.constexpr, NORM3: tl.constexpr, DZ_SCALED: tl.constexpr,
             CENTRED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
             EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, V_ROWS: tl.constexpr,
             BLOCK_N: tl.constexpr):  # fmt: skip
    """Last pass: dZ from the normalised rows DZ kept (ẑ, or t̂ without a post-norm) and dY,
    stored over them (_store_dz)."""
    for n0 in range(0, D, BLOCK_N):
        kept_hat, dy, offs_n, n_mask, mask = _read_chunk(dz_rows, dy_rows, dy_strides, n0,
                                                         m_mask, D, ACC_DTYPE,
                                                         BLOCK_N)  # fmt: skip
        if NORM2 != NO_NORM:
            dt = dy
            if NORM3 != NO_NORM:
                t_hat = _stem_input_hat(kept_hat, pos_rows, offs_n, n_mask, mask, norm2, Pos, D,
                                        mean3, rstd3, NORM2, NORM3, ACC_DTYPE)  # fmt: skip
                dt = _grad_t(dy, t_hat, norm3, offs_n, n_mask, rstd3, mean_g3, mean_gt3, NORM3,
                             ACC_DTYPE)  # fmt: skip
            g = scale_cols(dt, norm2[0], offs_n, n_mask, ACC_DTYPE)
            dz = norm_bwd(g, kept_hat, rstd2, mean_g2, mean_gz2, NORM2)
        else:
            dz = _grad_t(dy, kept_hat, norm3, offs_n, n_mask, rstd3, mean_g3, mean_gt3, NORM3,
                         ACC_DTYPE)  # fmt: skip
        _store_dz(tl.where(mask, dz, 0.0), offs_n, n_mask, mask, part, dz_rows, dt_rows,
                  v_rows, rstd1, centre_mean, DZ_SCALED, CENTRED, COMPUTE_DTYPE, ACC_DTYPE,
                  EMULATE_BF16, BLOCK_M, V_ROWS)  # fmt: skip


@triton.jit
def _pass_dy(dz_rows, v_rows, dy_rows, dy_strides, m_mask, part, centre_mean, rstd1, D,
             DZ_SCALED: tl.constexpr, CENTRED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
             ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
             V_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """No norm over D: dZ is dY itself. Its column sums (-> dbias), and with DZ_SCALED the dW
    GEMM's operand (_store_dz); else the GEMM reads dY in place."""
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D
        mask = m_mask[:, None] & n_mask[None, :]
        dy = tl.load(dy_rows[:, None] + offs_n[None, :] * dy_strides[2], mask=mask, other=0.0)
        dy = dy.to(ACC_DTYPE)
        if DZ_SCALED:
            _store_dz(dy, offs_n, n_mask, mask, part, dz_rows, None, v_rows, rstd1, centre_mean,
                      DZ_SCALED, CENTRED, COMPUTE_DTYPE, ACC_DTYPE, EMULATE_BF16, BLOCK_M,
                      V_ROWS)  # fmt: skip
        else:
            add_partial(part, PART_DZ, offs_n, n_mask, tl.sum(dy, axis=0))


@triton.jit
def _dz_tile(tile, part, X, stride_xb, x_strides, W, stride_wd, w_strides, w_row_len, Bias,
             norm1, norm2, Pos, Keep, PosIndex, norm3, Stats, DY, dy_strides, DZ, DT, VPart,
             Hostile, XRowOff, DZRowOff, M, K, D, rows, grid, C: tl.constexpr,
             PATCH: tl.constexpr, NORM1: tl.constexpr, NORM2: tl.constexpr, NORM3: tl.constexpr,
             DY_FLAT: tl.constexpr, DZ_SCALED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
             DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
             W_FLAT: tl.constexpr, CHANNELS_FIRST: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, V_ROWS: tl.constexpr):  # fmt: skip
    """Everything the backward needs from the token tile ``tile``, its column sums added into
    ``part`` (column_partials.add_partial)."""
    offs_m, m_mask, row_off, position = token_rows(tl.cast(tile, tl.int64) * BLOCK_M, M, rows,
                                                   grid, Keep, PATCH, stride_xb, x_strides,
                                                   BLOCK_M)  # fmt: skip
    tl.store(XRowOff + offs_m, row_off, mask=m_mask)
    pos_rows = table_rows(position, PosIndex, offs_m, m_mask)
    dy_off = token_offsets(offs_m, rows, dy_strides, DY_FLAT)
    dy_rows = DY + dy_off
    dz_rows = DZ + offs_m[:, None] * D
    mean1 = load_stat(Stats, MEAN1, offs_m, m_mask, M)
    rstd1 = load_stat(Stats, RSTD1, offs_m, m_mask, M)
    CENTRED: tl.constexpr = DZ_SCALED and NORM1 == LAYER_NORM
    v_rows = None
    centre_mean = mean1
    if CENTRED:
        # Tokens the fold would cancel on (NaN statistics included): the dW GEMM's folded loop
        # reads their Ẑ rows as the row of zeros after the M rows, and its second loop takes
        # them from their own rows (kernels/patch_embed_bwd_dw.py); they add nothing to v.
        unfit = m_mask & fold_unfit(mean1, rstd1)
        tl.store(DZRowOff + offs_m, tl.where(unfit, M, offs_m) * D, mask=m_mask)
        centre_mean = tl.where(unfit, 0.0, mean1)
        groups = tile * (BLOCK_M // V_ROWS) + tl.arange(0, BLOCK_M // V_ROWS)
        v_rows = VPart + groups.to(tl.int64) * D
        flags = tl.reshape(unfit.to(tl.int32), (BLOCK_M // V_ROWS, V_ROWS))
        tl.store(Hostile + groups, tl.max(flags, axis=1))

    if NORM2 == NO_NORM and NORM3 == NO_NORM:
        if DZRowOff is not None and not DZ_SCALED:
            tl.store(DZRowOff + offs_m, dy_off, mask=m_mask)
        _pass_dy(dz_rows, v_rows, dy_rows, dy_strides, m_mask, part, centre_mean, rstd1, D,
                 DZ_SCALED, CENTRED, COMPUTE_DTYPE, ACC_DTYPE, EMULATE_BF16, BLOCK_M, V_ROWS,
                 BLOCK_N)  # fmt: skip
    else:
        mean2 = load_stat(Stats, MEAN2, offs_m, m_mask, M)
        rstd2 = load_stat(Stats, RSTD2, offs_m, m_mask, M)
        mean3 = load_stat(Stats, MEAN3, offs_m, m_mask, M)
        rstd3 = load_stat(Stats, RSTD3, offs_m, m_mask, M)
        # Means over D of g and g * t̂ for each norm's backward (g: its upstream gradient times
        # its weight): the stem norm's (3) and the post-norm's (2).
        mean_g, mean_gt = _pass_normalised(
            X, x_strides, row_off, m_mask, W, stride_wd, w_strides, w_row_len, Bias, norm1,
            mean1, rstd1, norm2, mean2, rstd2, Pos, pos_rows, norm3, mean3, rstd3, dy_rows,
            dy_strides, dz_rows, part, K, D, C, PATCH, NORM1, NORM2, NORM3, COMPUTE_DTYPE,
            DOT_PRECISION, ACC_DTYPE, EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N,
            BLOCK_K,
        )  # fmt: skip
        mean_g3, mean_gt3 = mean_g, mean_gt  # used only with a stem norm
        mean_g2, mean_gz2 = mean_g, mean_gt  # the post-norm's, without a stem norm
        if NORM2 != NO_NORM and NORM3 != NO_NORM:
            tl.debug_barrier()
            mean_g2, mean_gz2 = _pass_post_sums(
                dz_rows, dy_rows, dy_strides, offs_m, m_mask, pos_rows, norm2, Pos, norm3,
                mean3, rstd3, mean_g3, mean_gt3, DT, part, D, NORM2, NORM3, COMPUTE_DTYPE,
                ACC_DTYPE, EMULATE_BF16, BLOCK_M, BLOCK_N,
            )  # fmt: skip
        # dT is dZ itself without a post-norm: stored beside the scaled operand.
        dt_rows = DT + offs_m[:, None] * D if NORM2 == NO_NORM and DT is not None else None
        tl.debug_barrier()
        _pass_dz(
            dz_rows, dt_rows, v_rows, dy_rows, dy_strides, m_mask, pos_rows, norm2, rstd2,
            mean_g2, mean_gz2, Pos, norm3, mean3, rstd3, mean_g3, mean_gt3, part, centre_mean,
            rstd1, D, NORM2, NORM3, DZ_SCALED, CENTRED, COMPUTE_DTYPE, ACC_DTYPE, EMULATE_BF16,
            BLOCK_M, V_ROWS, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _bwd_dz_kernel(
    X, stride_xb, x_strides, W, stride_wd, w_strides, w_row_len, Bias, norm1,  # as the forward
    norm2,  # (weight, bias) of the post-norm: the weight scales dT, the bias only says db2
    Pos,  # (N, D) position table or None
    Keep,  # (B, rows) int64 grid positions embedded per image, or None
    PosIndex,  # (B, rows) int64 table row of each token, or None
    norm3,  # (weight, bias) of the stem norm
    Prefix, P, eps3,  # (P, D) prefix rows or None, P, the stem norm's epsilon; out: their
    DPrefix, PrefixDY, prefix3,  # gradient, dY summed over the images, parts of (dg3, db3)
    Stats,  # (len(STAT_ROWS), M): row statistics from the forward
    DY, dy_strides,  # upstream gradient of the patch tokens (B, N, D), any strides
    DZ,  # out: (M, D) COMPUTE_DTYPE, the dW GEMM's operand: dZ, or Ẑ (DZ_SCALED; + a row of
    # zeros with a LayerNorm pre-norm); dY itself, not written, without a norm over D either
    DT,  # out: (M, D) dT for the table's gradient where it is neither dY nor in DZ; or None
    Partials,  # out: (len(COLUMN_SUMS), programs, D) ACC_DTYPE column sums per program
    VPart,  # out: (groups, D) sums of Ẑ * mean1 per V_ROWS tokens (Ẑ, LayerNorm pre-norm)
    Hostile,  # out: (groups,) int32, 1 for a group with a token the fold would cancel on
    XRowOff,  # out: (M,) int64 image offset of each token's first pixel, for the dW kernel
    DZRowOff,  # out: (M,) int64 dZ row offsets for the dW kernel's folded loop where dZ is dY
    # with rows not evenly spaced, or Ẑ with a LayerNorm pre-norm (its row of zeros); or None
    Counters, n_counters,  # out: the dW kernel's (int32), zeroed
    M, K, D, rows, grid,
    C: tl.constexpr, PATCH: tl.constexpr, NORM1: tl.constexpr, NORM2: tl.constexpr,
    NORM3: tl.constexpr, DY_FLAT: tl.constexpr,
    DZ_SCALED: tl.constexpr,  # store Ẑ = dZ * rstd1 (the dW GEMM's folded operand)
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
    W_FLAT: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    V_ROWS: tl.constexpr,  # tokens per group of the centring sums (divides BLOCK_M)
    BLOCK_P: tl.constexpr,  # prefix rows of the last program (>= P)
):  # fmt: skip
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if Prefix is not None:
        programs -= 1
        if pid == programs:
            prefix_grads(Prefix, P, DY, dy_strides, M // rows, D, norm3, eps3, DPrefix, PrefixDY,
                         prefix3, NORM3, ACC_DTYPE, EMULATE_BF16, BLOCK_P, BLOCK_N)  # fmt: skip
            return
    if pid == 0:
        zero(Counters, n_counters, 128)
        if DZ_SCALED and NORM1 == LAYER_NORM:
            zero(DZ + M * D, D, 128)
    # This program's place in the partials and the distance between two of their rows.
    base, row_stride = Partials + pid * D, programs * D
    for tile in range(pid, tl.cdiv(M, BLOCK_M), programs):
        _dz_tile(
            tile, (base, row_stride, tile > pid), X, stride_xb, x_strides, W, stride_wd,
            w_strides, w_row_len, Bias, norm1, norm2, Pos, Keep, PosIndex, norm3, Stats, DY,
            dy_strides, DZ, DT, VPart, Hostile, XRowOff, DZRowOff, M, K, D, rows, grid, C, PATCH,
            NORM1, NORM2, NORM3, DY_FLAT, DZ_SCALED, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE,
            EMULATE_BF16, W_FLAT, CHANNELS_FIRST, BLOCK_M, BLOCK_N, BLOCK_K, V_ROWS,
        )  # fmt: skip
        tl.debug_barrier()  # the next tile adds to the partials this one stored
