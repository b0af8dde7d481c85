"""The projection weight as the forward's main loop reads it (docs/design.md, "Forward main
loop"), made per call:

    W' = W * g1, rounded to the GEMM operand dtype, rows in the main loop's K order,
         zero-padded to the row stride
    s  = row sums of the rounded W' (a LayerNorm pre-norm: its mean is subtracted as mean * s)
    b' = W @ b1 + bias

so that norm1(p) @ W.T + bias = rstd * (p @ W'.T - mean * s) + b' (kernels/projection.py).
Sums of the rounded W' make that subtraction exact up to fp32 accumulation. Without a pre-norm
the same kernel only re-lays W (a conv weight, or rows that are not 16-element aligned). As the
call's first kernel it also zeroes the main kernel's row counters (kernels/counters.py).
Device code only: the launcher allocates the outputs.
"""

import triton
import triton.language as tl

from .counters import zero
from .geometry import patch_cols
from .rounding import cast


@triton.jit
def _fold_weight_kernel(
    W, stride_wd, w_strides,  # Linear (D, K) in (*patch, c) order or conv (D, C, *patch)
    norm1,  # (weight, bias) of the pre-norm, (K,) in (*patch, c) order; either None
    p_strides,  # element strides (c, *patch) of those (K,) vectors
    Bias,  # (D,) or None
    WOut, stride_od,  # out: (D, stride_od) W' in COMPUTE_DTYPE, zero beyond K
    ColSum,  # out: (D,) ACC_DTYPE row sums of W', or None
    BiasOut,  # out: (D,) ACC_DTYPE b', or None
    Counters, n_counters,  # out: the main kernel's row counters (int32), zeroed; or None
    K, D,
    C: tl.constexpr, PATCH: tl.constexpr,
    W_FLAT: tl.constexpr,  # W holds each row contiguously in the K order
    CHANNELS_FIRST: tl.constexpr,  # the K order of W' (geometry.patch_cols)
    COMPUTE_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    if Counters is not None and tl.program_id(0) == 0:
        zero(Counters, n_counters, 128)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    w_rows = W + offs_d[:, None].to(tl.int64) * stride_wd
    out_rows = WOut + offs_d[:, None].to(tl.int64) * stride_od
    g1, b1 = norm1
    sums = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    shifts = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    for k0 in range(0, stride_od, BLOCK_K):
        offs_k, k_mask, w_col = patch_cols(k0, K, C, PATCH, w_strides, W_FLAT, CHANNELS_FIRST,
                                           BLOCK_K)  # fmt: skip
        p_col = patch_cols(k0, K, C, PATCH, p_strides, False, CHANNELS_FIRST, BLOCK_K)[2]
        w = tl.load(w_rows + w_col[None, :], mask=d_mask[:, None] & k_mask[None, :], other=0.0)
        w = w.to(ACC_DTYPE)
        folded = w
        if g1 is not None:
            folded = w * tl.load(g1 + p_col, mask=k_mask, other=0.0).to(ACC_DTYPE)[None, :]
        folded = cast(folded, COMPUTE_DTYPE, EMULATE_BF16)
        tl.store(out_rows + offs_k[None, :], folded,
                 mask=d_mask[:, None] & (offs_k < stride_od)[None, :])  # fmt: skip
        sums += tl.sum(folded.to(ACC_DTYPE), axis=1)
        if b1 is not None:
            b = tl.load(b1 + p_col, mask=k_mask, other=0.0).to(ACC_DTYPE)
            shifts += tl.sum(w * b[None, :], axis=1)
    if ColSum is not None:
        tl.store(ColSum + offs_d, sums, mask=d_mask)
    if BiasOut is not None:
        if Bias is not None:
            shifts += tl.load(Bias + offs_d, mask=d_mask, other=0.0).to(ACC_DTYPE)
        tl.store(BiasOut + offs_d, shifts, mask=d_mask)
