"""Fused patch-embedding forward: gather patches -> LayerNorm_K -> x @ W.T + bias -> LayerNorm_D.

One program owns BLOCK_M tokens and every output column of them, so the post-norm sees whole
rows without a second launch. Device code only: the launch module allocates and builds the grid.
"""

import triton
import triton.language as tl

from .patch_tiles import patch_stats, project_chunk, token_rows
from .rounding import cast


@triton.jit
def _patch_embed_fwd_kernel(
    X,  # image (B, C, H, W), any strides
    W,  # projection weight, read through strides (d, c, i, j): Linear (D, K) or Conv2d
    Bias,  # (D,) or dummy when not HAS_BIAS
    G1,  # pre-norm weight (K,) or dummy
    B1,  # pre-norm bias (K,) or dummy
    G2,  # post-norm weight (D,) or dummy
    B2,  # post-norm bias (D,) or dummy
    Y,  # output (M, D) contiguous, M = B * N tokens
    Stats,  # (4, M) in ACC: mean1, rstd1, mean2, rstd2 (0 / 1 where a norm is off)
    M,
    K,
    KW,  # readable length of W's rows (>= K, zero-padded beyond it)
    D,
    C: tl.constexpr,  # channels and patch size are compile-time: the patch-column index math
    PH: tl.constexpr,  # divides by them on every K step, and the gather vectorises only when
    PW: tl.constexpr,  # the compiler can see its contiguous runs
    NP,  # tokens per image
    WP,  # patches per image row
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wd,
    stride_wc,
    stride_wi,
    stride_wj,
    eps,
    PRE_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    POST_NORM: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,  # GEMM operand dtype
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    ACC: tl.constexpr,  # accumulation / statistics dtype: fp32 (fp64 for fp64 inputs)
    INTERPRETED: tl.constexpr,  # interpreter: emulate bf16 rounding, multiply in ACC
    W_FLAT: tl.constexpr,  # W holds the patch axis contiguously in the K order
    CIJ: tl.constexpr,  # K order (c, i, j) rather than (i, j, c): see patch_tiles.patch_cols
    ROW_IN_ONE_TILE: tl.constexpr,  # BLOCK_N >= D: the post-norm needs no second pass
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    m_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_m, m_mask, row_off = token_rows(
        m_start, M, NP, WP, PH, PW, stride_xb, stride_xh, stride_xw, BLOCK_M
    )
    mean1 = tl.zeros([BLOCK_M], dtype=ACC)
    rstd1 = tl.full([BLOCK_M], 1.0, dtype=ACC)
    if PRE_NORM:
        mean1, rstd1 = patch_stats(
            X, row_off, m_mask, K, C, PH, PW, stride_xc, stride_xh, stride_xw, CIJ, eps, ACC,
            BLOCK_M, BLOCK_K,
        )  # fmt: skip

    # Post-norm statistics merged across column chunks (Chan et al.): chunk-centred sums keep
    # the variance accurate when |mean| >> std.
    mean2 = tl.zeros([BLOCK_M], dtype=ACC)
    m2 = tl.zeros([BLOCK_M], dtype=ACC)
    y_rows = Y + offs_m[:, None] * D
    for n0 in range(0, D, BLOCK_N):
        acc, offs_n, n_mask = project_chunk(
            X, W, Bias, G1, B1, row_off, m_mask, mean1, rstd1, n0, K, KW, D, C, PH, PW,
            stride_xc, stride_xh, stride_xw, stride_wd, stride_wc, stride_wi, stride_wj,
            PRE_NORM, HAS_BIAS, COMPUTE_DTYPE, DOT_PRECISION, ACC, INTERPRETED, W_FLAT, CIJ,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if POST_NORM:
            n_valid = tl.minimum(D - n0, BLOCK_N) * 1.0
            chunk_mean = tl.sum(tl.where(n_mask[None, :], acc, 0.0), axis=1) / n_valid
            centred = tl.where(n_mask[None, :], acc - chunk_mean[:, None], 0.0)
            chunk_m2 = tl.sum(centred * centred, axis=1)
            n_seen = n0 * 1.0
            n_total = n_seen + n_valid
            delta = chunk_mean - mean2
            mean2 += delta * (n_valid / n_total)
            m2 += chunk_m2 + delta * delta * (n_seen * n_valid / n_total)
            if ROW_IN_ONE_TILE:
                # The whole row is in registers: normalise now, no second pass.
                rstd2 = 1.0 / tl.sqrt(m2 / D + eps)
                g2 = tl.load(G2 + offs_n, mask=n_mask, other=0.0).to(ACC)
                b2 = tl.load(B2 + offs_n, mask=n_mask, other=0.0).to(ACC)
                acc = (acc - mean2[:, None]) * rstd2[:, None] * g2[None, :] + b2[None, :]
        out = cast(acc, Y.dtype.element_ty, INTERPRETED)
        tl.store(y_rows + offs_n[None, :], out, mask=m_mask[:, None] & n_mask[None, :])

    rstd2 = tl.full([BLOCK_M], 1.0, dtype=ACC)
    if POST_NORM:
        rstd2 = 1.0 / tl.sqrt(m2 / D + eps)
        if not ROW_IN_ONE_TILE:
            # Rows wider than one tile: normalise the un-normalised rows just written (still
            # in L2). The barrier orders this program's stores before its loads, which read
            # through L2 (".cg") rather than a possibly stale L1 line.
            tl.debug_barrier()
            for n0 in range(0, D, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_mask = offs_n < D
                mask = m_mask[:, None] & n_mask[None, :]
                z = tl.load(y_rows + offs_n[None, :], mask=mask, other=0.0, cache_modifier=".cg")
                z = z.to(ACC)
                g2 = tl.load(G2 + offs_n, mask=n_mask, other=0.0).to(ACC)
                b2 = tl.load(B2 + offs_n, mask=n_mask, other=0.0).to(ACC)
                z = (z - mean2[:, None]) * rstd2[:, None] * g2[None, :] + b2[None, :]
                tl.store(y_rows + offs_n[None, :], cast(z, Y.dtype.element_ty, INTERPRETED),
                         mask=mask)  # fmt: skip

    tl.store(Stats + offs_m, mean1, mask=m_mask)
    tl.store(Stats + M + offs_m, rstd1, mask=m_mask)
    tl.store(Stats + 2 * M + offs_m, mean2, mask=m_mask)
    tl.store(Stats + 3 * M + offs_m, rstd2, mask=m_mask)
