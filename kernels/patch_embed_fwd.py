"""Fused patch-embedding forward: gather patches -> LayerNorm_K -> x @ W.T + bias -> LayerNorm_D.

One program owns BLOCK_M tokens and every output column of them, so the post-norm sees whole
rows without a second launch. Device code only: the launch module allocates and builds the grid.
"""

import triton
import triton.language as tl

from .rounding import cast


@triton.jit
def _load_patch_tile(
    X,  # image base pointer, (B, C, H, W) with any strides
    row_off,  # [BLOCK_M] int64 offset of each token's top-left pixel
    row_mask,  # [BLOCK_M] valid tokens
    k0,  # first patch element of this tile
    K,  # C * ph * pw
    C,
    PW,  # patch width
    stride_xc,
    stride_xh,
    stride_xw,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile [BLOCK_M, BLOCK_K] of flattened patches, k = (i * pw + j) * C + c; 0 outside."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    c = offs_k % C
    j = (offs_k // C) % PW
    i = offs_k // (C * PW)
    col_off = c.to(tl.int64) * stride_xc + i.to(tl.int64) * stride_xh + j.to(tl.int64) * stride_xw
    mask = row_mask[:, None] & k_mask[None, :]
    tile = tl.load(X + row_off[:, None] + col_off[None, :], mask=mask, other=0.0)
    return tile.to(ACC), offs_k, k_mask, mask


@triton.jit
def _patch_embed_fwd_kernel(
    X,  # image (B, C, H, W), any strides
    W,  # projection weight (D, K), k in (p1 p2 c) order
    Bias,  # (D,) or dummy when not HAS_BIAS
    G1,  # pre-norm weight (K,) or dummy
    B1,  # pre-norm bias (K,) or dummy
    G2,  # post-norm weight (D,) or dummy
    B2,  # post-norm bias (D,) or dummy
    Y,  # output (M, D) contiguous, M = B * N tokens
    Stats,  # (4, M) fp32: mean1, rstd1, mean2, rstd2 (0 / 1 where a norm is off)
    M,
    K,
    D,
    C,
    PH,  # patch height
    PW,  # patch width
    NP,  # tokens per image
    WP,  # patches per image row
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wd,
    stride_wk,
    eps,
    PRE_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    POST_NORM: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,  # GEMM operand dtype (fp32 accumulation always)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    ACC: tl.constexpr,  # accumulation / statistics dtype: fp32 (fp64 for fp64 inputs)
    INTERPRETED: tl.constexpr,  # interpreter: emulate bf16 rounding, multiply in ACC
    ROW_IN_ONE_TILE: tl.constexpr,  # BLOCK_N >= D: the post-norm needs no second pass
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    b = offs_m // NP
    t = offs_m % NP
    hp = t // WP
    wp = t % WP
    row_off = b * stride_xb + hp * (PH * stride_xh) + wp * (PW * stride_xw)

    # Pre-norm statistics, exact two-pass (mean, then centred variance) in fp32: raw 0..255
    # pixels have |mean| >> std, where E[x^2] - E[x]^2 would cancel.
    mean1 = tl.zeros([BLOCK_M], dtype=ACC)
    rstd1 = tl.full([BLOCK_M], 1.0, dtype=ACC)
    if PRE_NORM:
        acc_sum = tl.zeros([BLOCK_M], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            p, offs_k, k_mask, mask = _load_patch_tile(
                X, row_off, m_mask, k0, K, C, PW, stride_xc, stride_xh, stride_xw, ACC, BLOCK_K
            )
            acc_sum += tl.sum(p, axis=1)
        mean1 = acc_sum / K
        acc_var = tl.zeros([BLOCK_M], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            p, offs_k, k_mask, mask = _load_patch_tile(
                X, row_off, m_mask, k0, K, C, PW, stride_xc, stride_xh, stride_xw, ACC, BLOCK_K
            )
            centred = tl.where(mask, p - mean1[:, None], 0.0)
            acc_var += tl.sum(centred * centred, axis=1)
        rstd1 = 1.0 / tl.sqrt(acc_var / K + eps)

    # Post-norm statistics merged across column chunks (Chan et al.): chunk-centred sums keep
    # the variance accurate when |mean| >> std.
    mean2 = tl.zeros([BLOCK_M], dtype=ACC)
    m2 = tl.zeros([BLOCK_M], dtype=ACC)
    y_rows = Y + offs_m[:, None] * D
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            a, offs_k, k_mask, mask = _load_patch_tile(
                X, row_off, m_mask, k0, K, C, PW, stride_xc, stride_xh, stride_xw, ACC, BLOCK_K
            )
            if PRE_NORM:
                g1 = tl.load(G1 + offs_k, mask=k_mask, other=0.0).to(ACC)
                b1 = tl.load(B1 + offs_k, mask=k_mask, other=0.0).to(ACC)
                a = (a - mean1[:, None]) * rstd1[:, None] * g1[None, :] + b1[None, :]
            w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wd + offs_k[:, None] * stride_wk
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            a = cast(a, COMPUTE_DTYPE, INTERPRETED)
            w = cast(w, COMPUTE_DTYPE, INTERPRETED)
            if INTERPRETED:  # bf16 tl.dot is wrong in the interpreter
                acc += tl.dot(a.to(ACC), w.to(ACC))
            else:
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
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
        out_mask = m_mask[:, None] & n_mask[None, :]
        tl.store(
            y_rows + offs_n[None, :], cast(acc, Y.dtype.element_ty, INTERPRETED), mask=out_mask
        )

    rstd2 = tl.full([BLOCK_M], 1.0, dtype=ACC)
    if POST_NORM:
        rstd2 = 1.0 / tl.sqrt(m2 / D + eps)
        if not ROW_IN_ONE_TILE:
            # Rows wider than one tile: normalise the un-normalised rows just written (still
            # in L2). The barrier orders this program's stores before its loads.
            tl.debug_barrier()
            for n0 in range(0, D, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_mask = offs_n < D
                out_mask = m_mask[:, None] & n_mask[None, :]
                z = tl.load(y_rows + offs_n[None, :], mask=out_mask, other=0.0).to(ACC)
                g2 = tl.load(G2 + offs_n, mask=n_mask, other=0.0).to(ACC)
                b2 = tl.load(B2 + offs_n, mask=n_mask, other=0.0).to(ACC)
                z = (z - mean2[:, None]) * rstd2[:, None] * g2[None, :] + b2[None, :]
                tl.store(
                    y_rows + offs_n[None, :],
                    cast(z, Y.dtype.element_ty, INTERPRETED),
                    mask=out_mask,
                )

    tl.store(Stats + offs_m, mean1, mask=m_mask)
    tl.store(Stats + M + offs_m, rstd1, mask=m_mask)
    tl.store(Stats + 2 * M + offs_m, mean2, mask=m_mask)
    tl.store(Stats + 3 * M + offs_m, rstd2, mask=m_mask)
