"""The second stage of the backward's sums, inside the dW kernel (docs/design.md, "Backward"):
every gradient the op returns, summed in a fixed order and cast to its parameter's dtype.
Pure @triton.jit functions, no launches.

- the weight tile's last split (an integer counter per tile decides which, the sums' order
  does not depend on it): G = Σ_s GPart[s] in split order, then dW = G diag(g1) + dbias b1ᵀ,
  and the tile's parts of dg1 = Σ_d W ∘ G and db1 = Wᵀ dbias; the last weight tile of a K tile
  sums those parts in D-tile order (:func:`finish_tile`, :func:`_finish_columns`);
- column programs: the dZ kernel's per-program column partials (dbias, the post- and stem-norm
  parameters) summed in program order, plus the prefix rows' parts (:func:`column_program`);
- table programs: the position table's gradient, dT summed over the batch in order
  (:func:`table_program`).

Deterministic: no floating-point atomics; the counters (kernels/counters.py) only pick who
sums, and the summing program reads through L2 (gather.READ_BACK).
"""

import triton
import triton.language as tl

from .column_partials import PART_DB2, PART_DB3, PART_DG2, PART_DG3, PART_DZ
from .counters import arrived_last
from .gather import READ_BACK
from .geometry import patch_cols
from .rounding import cast

# Split slots of G summed per step by a tile's finisher: [G_SLOTS, FIN_D, BLOCK_K] in fp32 is
# 32 registers a thread at the defaults (8 warps, 64 x 64), few enough not to raise the GEMM
# loop's count.
G_SLOTS = tl.constexpr(2)


@triton.jit
def slice_sum(Rows, row_stride, first, end, offs, mask, ACC_DTYPE: tl.constexpr,
              ROWS: tl.constexpr):  # fmt: skip
    """Σ over first <= p < end of Rows[p * row_stride + offs] in ACC_DTYPE, ROWS rows at a
    time (a fixed order)."""
    total = tl.zeros(offs.shape, dtype=ACC_DTYPE)
    for p0 in range(first, end, ROWS):
        p = p0 + tl.arange(0, ROWS)
        block = tl.load(Rows + p[:, None].to(tl.int64) * row_stride + offs[None, :],
                        mask=(p < end)[:, None] & mask[None, :], other=0.0,
                        cache_modifier=READ_BACK)  # fmt: skip
        total += tl.sum(block.to(ACC_DTYPE), axis=0)
    return total


@triton.jit
def split_bounds(s, splits, n_parts):
    """The programs of the dZ kernel whose column partials token split s sums."""
    return s * n_parts // splits, (s + 1) * n_parts // splits


@triton.jit
def column_sum(Partials, ROW: tl.constexpr, n_parts, splits, offs, mask, D,
               ACC_DTYPE: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """Row ROW of the dZ kernel's column partials (COLUMN_SUMS, n_parts, D) summed split
    slice by split slice (the slices the weight tiles sum for dbias, SplitSums; they add the
    slices up in blocks of SUM_ROWS, this sequentially: both fixed orders)."""
    total = tl.zeros(offs.shape, dtype=ACC_DTYPE)
    rows = Partials + ROW * n_parts * D
    for s in range(0, splits):
        first, end = split_bounds(s, splits, n_parts)
        total += slice_sum(rows, D, first, end, offs, mask, ACC_DTYPE, ROWS)
    return total


@triton.jit
def _store_cast(Out, offs, mask, value, EMULATE_BF16: tl.constexpr):
    tl.store(Out + offs, cast(value, Out.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit
def column_program(c, Partials, n_parts, splits, DBias, dnorm2, dnorm3, prefix3, D,
                   ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   BLOCK_C: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """Columns c * BLOCK_C ... of the vector gradients over D that exist: the bias's, the
    post-norm's (dnorm2) and the stem norm's (dnorm3, plus the prefix rows' parts prefix3)."""
    offs = c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < D
    if DBias is not None:
        total = column_sum(Partials, PART_DZ, n_parts, splits, offs, mask, D, ACC_DTYPE, ROWS)
        _store_cast(DBias, offs, mask, total, EMULATE_BF16)
    if dnorm2[0] is not None:
        total = column_sum(Partials, PART_DG2, n_parts, splits, offs, mask, D, ACC_DTYPE, ROWS)
        _store_cast(dnorm2[0], offs, mask, total, EMULATE_BF16)
    if dnorm2[1] is not None:
        total = column_sum(Partials, PART_DB2, n_parts, splits, offs, mask, D, ACC_DTYPE, ROWS)
        _store_cast(dnorm2[1], offs, mask, total, EMULATE_BF16)
    if dnorm3[0] is not None:
        total = column_sum(Partials, PART_DG3, n_parts, splits, offs, mask, D, ACC_DTYPE, ROWS)
        if prefix3[0] is not None:
            total += tl.load(prefix3[0] + offs, mask=mask, other=0.0)
        _store_cast(dnorm3[0], offs, mask, total, EMULATE_BF16)
    if dnorm3[1] is not None:
        total = column_sum(Partials, PART_DB3, n_parts, splits, offs, mask, D, ACC_DTYPE, ROWS)
        if prefix3[1] is not None:
            total += tl.load(prefix3[1] + offs, mask=mask, other=0.0)
        _store_cast(dnorm3[1], offs, mask, total, EMULATE_BF16)


@triton.jit
def table_program(i, DT, dt_strides, batch, rows, D, DPos, ACC_DTYPE: tl.constexpr,
                  EMULATE_BF16: tl.constexpr, BLOCK_B: tl.constexpr, TABLE_N: tl.constexpr,
                  TABLE_D: tl.constexpr):  # fmt: skip
    """Block i of the position table's gradient: dT (batch, rows, D) summed over the batch,
    BLOCK_B images at a time (a fixed order). Nothing without a table (DPos None)."""
    if DPos is not None:
        d_blocks = tl.cdiv(D, TABLE_D)
        offs_n = (i // d_blocks) * TABLE_N + tl.arange(0, TABLE_N)
        offs_d = (i % d_blocks) * TABLE_D + tl.arange(0, TABLE_D)
        mask = (offs_n < rows)[:, None] & (offs_d < D)[None, :]
        at = offs_n[:, None].to(tl.int64) * dt_strides[1] + offs_d[None, :] * dt_strides[2]
        total = tl.zeros([TABLE_N, TABLE_D], dtype=ACC_DTYPE)
        for b0 in range(0, batch, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            images = DT + b[:, None, None].to(tl.int64) * dt_strides[0]
            valid = (b < batch)[:, None, None] & mask[None, :, :]
            block = tl.load(images + at[None, :, :], mask=valid, other=0.0)
            total += tl.sum(block.to(ACC_DTYPE), axis=0)
        out = DPos + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(out, cast(total, DPos.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit
def _tile_g(GPart, splits, offs_d, offs_k, mask, D, K, ACC_DTYPE: tl.constexpr):
    """Rows offs_d of the weight tile's G: its splits' slots summed, G_SLOTS at a time."""
    at = offs_d[:, None].to(tl.int64) * K + offs_k[None, :]
    g = tl.zeros(at.shape, dtype=ACC_DTYPE)
    for s0 in range(0, splits, G_SLOTS):
        s = s0 + tl.arange(0, G_SLOTS)
        slots = tl.load(GPart + s[:, None, None].to(tl.int64) * D * K + at[None, :, :],
                        mask=(s < splits)[:, None, None] & mask[None, :, :], other=0.0,
                        cache_modifier=READ_BACK)  # fmt: skip
        g += tl.sum(slots, axis=0)
    return g


@triton.jit
def finish_tile(j, k, d_tiles, splits, GPart, SplitSums, ColCounters, W, stride_wd, w_strides,
                norm1, p_strides, DW, stride_dwd, dw_strides, dnorm1, DG1Part, K, D,
                C: tl.constexpr, PATCH: tl.constexpr, ACC_DTYPE: tl.constexpr,
                EMULATE_BF16: tl.constexpr, W_FLAT: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, FIN_D: tl.constexpr,
                SUM_ROWS: tl.constexpr):  # fmt: skip
    """The weight tile (j, k), by its last split: dW in the weight's dtype and layout, FIN_D
    rows at a time (few registers), and with pre-norm parameters their parts of dg1 and db1;
    the last tile of the K tile (ColCounters: one per K tile) finishes those (_finish_columns).
    SplitSums (K tiles, splits, D): each split's slice of dbias, summed here in split order
    (column_sum's order)."""
    G1, B1 = norm1
    k0 = k * BLOCK_K
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
    for d0 in range(j * BLOCK_D, (j + 1) * BLOCK_D, FIN_D):
        offs_d = d0 + tl.arange(0, FIN_D)
        d_mask = offs_d < D
        mask = d_mask[:, None] & k_mask[None, :]
        g = _tile_g(GPart, splits, offs_d, offs_k, mask, D, K, ACC_DTYPE)
        dw = g
        if G1 is not None or B1 is not None:
            w = tl.load(W + offs_d[:, None].to(tl.int64) * stride_wd + w_col[None, :], mask=mask,
                        other=0.0).to(ACC_DTYPE)  # fmt: skip
            if G1 is not None:
                dg1 += tl.sum(w * g, axis=0)
                dw = g * g1[None, :]
            if B1 is not None:
                dbias = slice_sum(SplitSums + k * splits * D, D, 0, splits, offs_d, d_mask,
                                  ACC_DTYPE, SUM_ROWS)  # fmt: skip
                db1 += tl.sum(w * dbias[:, None], axis=0)
                dw += dbias[:, None] * b1[None, :]
        out = DW + offs_d[:, None].to(tl.int64) * stride_dwd + dw_col[None, :]
        tl.store(out, cast(dw, DW.dtype.element_ty, EMULATE_BF16), mask=mask)
    if G1 is not None or B1 is not None:
        parts = DG1Part + j * K + offs_k  # (2, d_tiles, K): dg1's parts, then db1's
        tl.store(parts, dg1, mask=k_mask)
        tl.store(parts + d_tiles * K, db1, mask=k_mask)
        if arrived_last(ColCounters + k, d_tiles):
            _finish_columns(DG1Part, d_tiles, offs_k, k_mask, p_col, dnorm1, K, ACC_DTYPE,
                            EMULATE_BF16)  # fmt: skip


@triton.jit
def _finish_columns(DG1Part, d_tiles, offs_k, k_mask, p_col, dnorm1, K,
                    ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):  # fmt: skip
    """dg1 and db1 of a K tile: the weight tiles' parts in D-tile order."""
    dg1 = slice_sum(DG1Part, K, 0, d_tiles, offs_k, k_mask, ACC_DTYPE, 1)
    db1 = slice_sum(DG1Part + d_tiles * K, K, 0, d_tiles, offs_k, k_mask, ACC_DTYPE, 1)
    if dnorm1[0] is not None:
        _store_cast(dnorm1[0], p_col, k_mask, dg1, EMULATE_BF16)
    if dnorm1[1] is not None:
        _store_cast(dnorm1[1], p_col, k_mask, db1, EMULATE_BF16)
