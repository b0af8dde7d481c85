"""The backward's dW GEMM (docs/design.md, "Backward"): per weight tile (BLOCK_D rows of D,
BLOCK_K columns of K) and token split, the split's part of G = dZᵀ x̂, stored in the split's
slot of the partials (the tile's last split sums the slots in split order:
kernels/patch_embed_bwd_params.py). Pure @triton.jit functions, no launches.

Two forms of the product:

- folded (FOLD: a 16-bit image in the operand dtype): both operands reach tl.dot as they are
  stored, so Triton streams them through shared memory and keeps the tensor-core products in
  flight across token steps. The pre-norm is folded out of the loop:

      G = Σ_m dZ_m ⊗ x̂_m = Σ_m Ẑ_m ⊗ (x_m - mean_m) = Ẑᵀ X - v 1ᵀ,
      Ẑ = dZ * rstd1 (stored by the dZ kernel, rounded to the operand dtype),
      v = Σ_m Ẑ_m mean_m (summed by the dZ kernel from the rounded Ẑ, per group of tokens)

  An RMSNorm does not centre (no v); without a pre-norm Ẑ is dZ. For a LayerNorm (CENTRED)
  the subtraction cancels most of the fp32 sum when |mean| * rstd is large, so:
  the tokens are taken in chunks of CHUNK token tiles, each chunk's v subtracted from the
  accumulator before its products are added (few products accumulate across the cancellation,
  as in the forward's K loop); and tokens above projection.SHIFT_RATIO (projection.fold_unfit,
  NaN statistics included) are left out of that loop (the dZ kernel points their rows at a row
  of zeros) and added by a second loop over the split's tiles that hold any, Ẑᵀ (x - mean)
  with x - mean made in registers, rounded as the eager module rounds x̂. The loops run one
  after the other on one accumulator: an accumulator merged from two branches would cost a
  second copy of its registers (and can make ptxas serialise every wgmma).
- normalising (other images: fp32, fp64, autocast's inexact patches, fp16 with a pre-norm):
  x̂ made in registers from the image tile and the statistics, as the eager module makes it,
  on the unscaled dZ.
"""

import triton
import triton.language as tl

from .gather import raw_patches
from .norms import MEAN1, NO_NORM, RSTD1, load_stat, normalize
from .projection import fold_unfit
from .rounding import mma


@triton.jit
def _token_tile(t, M, XRowOff, ROW_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Token tile t: its rows, mask, and each token's image offset (stored by the dZ kernel:
    dividing by the image geometry on every step would cost more instructions than the
    product; the alignment the division would have shown the compiler is given instead)."""
    offs_m = tl.cast(t, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row_off = tl.multiple_of(tl.load(XRowOff + offs_m, mask=m_mask, other=0), ROW_ALIGN)
    return offs_m, m_mask, row_off


@triton.jit
def _dz_tile(DZ, dz_strides, DZRowOff, offs_m, m_mask, offs_d, d_mask, DZ_ALIGN: tl.constexpr):
    """[BLOCK_M, BLOCK_D] of the GEMM's dZ operand as stored; rows through DZRowOff where they
    are not evenly spaced (dY after prefix rows)."""
    if DZRowOff is not None:
        rows = tl.multiple_of(tl.load(DZRowOff + offs_m, mask=m_mask, other=0), DZ_ALIGN)
    else:
        rows = offs_m * dz_strides[1]
    return tl.load(DZ + rows[:, None] + offs_d[None, :] * dz_strides[2],
                   mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip


@triton.jit
def _raw_steps(acc, t_start, t_end, t_step, X, x_strides, XRowOff, k0, K, DZ, dz_strides,
               DZRowOff, offs_d, d_mask, M, C: tl.constexpr, PATCH: tl.constexpr,
               EVEN_K: tl.constexpr, X_RUN: tl.constexpr, ROW_ALIGN: tl.constexpr,
               DZ_ALIGN: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
               COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
               ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
    """acc + Σ over the token tiles t_start, t_start + t_step, ... < t_end of Ẑᵀ X, both
    operands as stored (the folded form's main loop)."""
    for t in range(t_start, t_end, t_step):
        offs_m, m_mask, row_off = _token_tile(t, M, XRowOff, ROW_ALIGN, BLOCK_M)
        x = raw_patches(X, x_strides, row_off, m_mask, k0, K, C, PATCH, EVEN_K, X_RUN,
                        CHANNELS_FIRST, BLOCK_K)[0]  # fmt: skip
        dz = _dz_tile(DZ, dz_strides, DZRowOff, offs_m, m_mask, offs_d, d_mask, DZ_ALIGN)
        acc = mma(acc, tl.trans(dz), x, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16)
    return acc


@triton.jit
def _normalising_steps(acc, t_start, t_end, t_step, X, x_strides, XRowOff, Stats, k0, K, DZ,
                       dz_strides, DZRowOff, offs_d, d_mask, M, C: tl.constexpr,
                       PATCH: tl.constexpr, NORM1: tl.constexpr, EVEN_K: tl.constexpr,
                       X_RUN: tl.constexpr, ROW_ALIGN: tl.constexpr, DZ_ALIGN: tl.constexpr,
                       CHANNELS_FIRST: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr):  # fmt: skip
    """acc + Σ over the token tiles of dZᵀ x̂, x̂ made in registers (the normalising form)."""
    for t in range(t_start, t_end, t_step):
        offs_m, m_mask, row_off = _token_tile(t, M, XRowOff, ROW_ALIGN, BLOCK_M)
        x, _offs_k, k_mask = raw_patches(X, x_strides, row_off, m_mask, k0, K, C, PATCH, EVEN_K,
                                         X_RUN, CHANNELS_FIRST, BLOCK_K)  # fmt: skip
        x = x.to(ACC_DTYPE)
        if NORM1 != NO_NORM:
            mean1 = load_stat(Stats, MEAN1, offs_m, m_mask, M)
            rstd1 = load_stat(Stats, RSTD1, offs_m, m_mask, M)
            x = tl.where(m_mask[:, None] & k_mask[None, :], normalize(x, mean1, rstd1, NORM1), 0.0)
        dz = _dz_tile(DZ, dz_strides, DZRowOff, offs_m, m_mask, offs_d, d_mask, DZ_ALIGN)
        acc = mma(acc, tl.trans(dz), x, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16)
    return acc


@triton.jit
def _unfit_tiles(Hostile, Tiles, s, splits, n_tiles, M, V_ROWS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The split's token tiles s, s + splits, ... that hold a token the fold leaves out (the
    dZ kernel's flags per group of V_ROWS tokens), written in tile order to Tiles (this
    program's row of the scratch); returns how many."""
    PER_TILE: tl.constexpr = BLOCK_M // V_ROWS
    count = 0
    for i0 in range(0, tl.cdiv(n_tiles - s, splits), BLOCK):
        tile = s + (i0 + tl.arange(0, BLOCK)) * splits
        group = tile[:, None].to(tl.int64) * PER_TILE + tl.arange(0, PER_TILE)[None, :]
        valid = (tile < n_tiles)[:, None] & (group * V_ROWS < M)
        flag = tl.max(tl.load(Hostile + group, mask=valid, other=0), axis=1)
        place = count + tl.cumsum(flag, axis=0) - flag
        tl.store(Tiles + place, tile, mask=flag != 0)
        count += tl.sum(flag, axis=0)
    return count


@triton.jit
def _unfit_steps(acc, Tiles, count, X, x_strides, XRowOff, Stats, k0, K, DZ, dz_strides,
                 offs_d, d_mask, M, C: tl.constexpr, PATCH: tl.constexpr, EVEN_K: tl.constexpr,
                 X_RUN: tl.constexpr, ROW_ALIGN: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
                 COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    """acc + Σ over the listed tiles' tokens the fold leaves out of Ẑᵀ (x - mean1), x - mean1
    made in registers (their Ẑ rows read where they are, not through DZRowOff)."""
    for i in range(0, count):
        offs_m, m_mask, row_off = _token_tile(tl.load(Tiles + i), M, XRowOff, ROW_ALIGN, BLOCK_M)
        x, _offs_k, k_mask = raw_patches(X, x_strides, row_off, m_mask, k0, K, C, PATCH, EVEN_K,
                                         X_RUN, CHANNELS_FIRST, BLOCK_K)  # fmt: skip
        mean1 = load_stat(Stats, MEAN1, offs_m, m_mask, M)
        rows = m_mask & fold_unfit(mean1, load_stat(Stats, RSTD1, offs_m, m_mask, M))
        x = tl.where(rows[:, None] & k_mask[None, :], x.to(ACC_DTYPE) - mean1[:, None], 0.0)
        dz = _dz_tile(DZ, dz_strides, None, offs_m, m_mask, offs_d, d_mask, 1)
        acc = mma(acc, tl.trans(dz), x, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16)
    return acc


@triton.jit
def _chunk_centre(VPart, c, c_end, t_step, offs_d, d_mask, M, D, CHUNK: tl.constexpr,
                  V_ROWS: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """v over the chunk's tokens for the rows offs_d: the dZ kernel's group sums, summed in
    tile order. Unrolled row loads: each thread keeps one value per load, where a 2-D load
    would hold a pointer per element."""
    PER_TILE: tl.constexpr = BLOCK_M // V_ROWS
    centre = tl.zeros(offs_d.shape, dtype=VPart.dtype.element_ty)
    for i in tl.static_range(CHUNK):
        tile = c + i * t_step
        for g in tl.static_range(PER_TILE):
            group = tl.cast(tile, tl.int64) * PER_TILE + g
            valid = (tile < c_end) & (group * V_ROWS < M)
            centre += tl.load(VPart + group * D + offs_d, mask=d_mask & valid, other=0.0)
    return centre


@triton.jit
def split_partial(j, k, s, splits, X, x_strides, Stats, XRowOff, DZ, dz_strides, DZRowOff,
                  VPart, Hostile, Tiles, program, GPart, M, K, D, C: tl.constexpr,
                  PATCH: tl.constexpr,
                  NORM1: tl.constexpr, FOLD: tl.constexpr, CENTRED: tl.constexpr,
                  EVEN_K: tl.constexpr, X_RUN: tl.constexpr, ROW_ALIGN: tl.constexpr,
                  DZ_ALIGN: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
                  COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                  V_ROWS: tl.constexpr):  # fmt: skip
    """Split s of the weight tile (j, k): G over the token tiles s, s + splits, ..., stored in
    the split's slot of GPart (splits, D, K). Tiles: the scratch that lists, in the row of
    each GEMM program (``program``), the tiles of the centred fold's second loop."""
    offs_d = j * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k0 = k * BLOCK_K
    n_tiles = tl.cdiv(M, BLOCK_M)
    acc = tl.zeros([BLOCK_D, BLOCK_K], dtype=ACC_DTYPE)
    if CENTRED:
        for c in range(s, n_tiles, splits * CHUNK):
            # The chunk's centring first: its products then bring the accumulator back from
            # it, and nothing of it stays live during the loop.
            centre = _chunk_centre(VPart, c, tl.minimum(c + splits * CHUNK, n_tiles), splits,
                                   offs_d, d_mask, M, D, CHUNK, V_ROWS, BLOCK_M)  # fmt: skip
            acc = _raw_steps(
                acc - centre[:, None], c, tl.minimum(c + splits * CHUNK, n_tiles), splits, X,
                x_strides, XRowOff, k0, K, DZ, dz_strides, DZRowOff, offs_d, d_mask, M, C,
                PATCH, EVEN_K, X_RUN, ROW_ALIGN, DZ_ALIGN, CHANNELS_FIRST, COMPUTE_DTYPE,
                DOT_PRECISION, ACC_DTYPE, EMULATE_BF16, BLOCK_M, BLOCK_K,
            )  # fmt: skip
            # Keeps the next chunk's centring out of this chunk's wgmma pipeline (as between
            # the forward's column tiles).
            tl.debug_barrier()
        listed = Tiles + program * tl.cdiv(n_tiles, splits)
        count = _unfit_tiles(Hostile, listed, s, splits, n_tiles, M, V_ROWS, BLOCK_M, 128)
        acc = _unfit_steps(
            acc, listed, count, X, x_strides, XRowOff, Stats, k0, K, DZ, dz_strides, offs_d,
            d_mask, M, C, PATCH, EVEN_K, X_RUN, ROW_ALIGN, CHANNELS_FIRST, COMPUTE_DTYPE,
            DOT_PRECISION, ACC_DTYPE, EMULATE_BF16, BLOCK_M, BLOCK_K,
        )  # fmt: skip
    elif FOLD:
        acc = _raw_steps(
            acc, s, n_tiles, splits, X, x_strides, XRowOff, k0, K, DZ, dz_strides, DZRowOff,
            offs_d, d_mask, M, C, PATCH, EVEN_K, X_RUN, ROW_ALIGN, DZ_ALIGN, CHANNELS_FIRST,
            COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16, BLOCK_M, BLOCK_K,
        )  # fmt: skip
    else:
        acc = _normalising_steps(
            acc, s, n_tiles, splits, X, x_strides, XRowOff, Stats, k0, K, DZ, dz_strides,
            DZRowOff, offs_d, d_mask, M, C, PATCH, NORM1, EVEN_K, X_RUN, ROW_ALIGN, DZ_ALIGN,
            CHANNELS_FIRST, COMPUTE_DTYPE, DOT_PRECISION, ACC_DTYPE, EMULATE_BF16, BLOCK_M,
            BLOCK_K,
        )  # fmt: skip
    offs_k = k0 + tl.arange(0, BLOCK_K)
    slot = GPart + (s.to(tl.int64) * D + offs_d[:, None]) * K + offs_k[None, :]
    tl.store(slot, acc, mask=d_mask[:, None] & (offs_k < K)[None, :])
