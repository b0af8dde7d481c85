"""Device helpers shared by the forward and backward kernels: patch gather, pre-norm statistics
and one column chunk of the projection. Pure @triton.jit functions, no launches."""

import triton
import triton.language as tl

from .rounding import cast, mma

# The default cache policy of tl.load, as a constexpr object: Triton 3.6 cannot compile a call
# that leaves a plain-string constexpr default unbound.
DEFAULT_CACHE = tl.constexpr("")


@triton.jit
def token_rows(m_start, M, NP, WP, PH, PW, stride_b, stride_h, stride_w, BLOCK_M: tl.constexpr):
    """Tokens m_start .. m_start + BLOCK_M: int64 index, mask, and the offset of each token's
    top-left pixel in an image with strides (stride_b, ., stride_h, stride_w). The token index
    is divided in 32 bits (the launcher keeps M < 2**31): a 64-bit division is a slow call."""
    tok = m_start.to(tl.int32) + tl.arange(0, BLOCK_M)
    b = tok // NP
    t = tok % NP
    row_off = (
        b.to(tl.int64) * stride_b
        + (t // WP).to(tl.int64) * (PH * stride_h)
        + (t % WP).to(tl.int64) * (PW * stride_w)
    )
    offs_m = tok.to(tl.int64)
    return offs_m, offs_m < M, row_off


@triton.jit
def patch_cols(k0, K, C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, stride_c, stride_h,
               stride_w, FLAT: tl.constexpr, CIJ: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Patch elements k0 .. k0 + BLOCK_K in the kernels' K order: index, mask, element offset.

    The order is (i, j, c), k = (i * pw + j) * C + c, the flattened-patch order of the
    projection weight; with CIJ it is (c, i, j), pixel rows innermost, so that a contiguous
    NCHW image yields runs of pw contiguous pixels and the gather vectorises. Any order gives
    the same GEMM as long as every operand of one product is read in it. FLAT: the operand
    holds the elements contiguously in this order (its offset is k itself), which the compiler
    can see: the loads vectorise."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if FLAT:
        col_off = offs_k.to(tl.int64)
    else:
        if CIJ:
            j = offs_k % PW
            i = (offs_k // PW) % PH
            c = offs_k // (PW * PH)
        else:
            c = offs_k % C
            j = (offs_k // C) % PW
            i = offs_k // (C * PW)
        col_off = c.to(tl.int64) * stride_c + i.to(tl.int64) * stride_h + j.to(tl.int64) * stride_w
    return offs_k, k_mask, col_off


@triton.jit
def param_cols(k0, K, C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, CIJ: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
    """Offsets of patch elements k0 .. k0 + BLOCK_K (kernel order) in a (K,) pre-norm
    parameter, which is stored in (i, j, c) order."""
    if CIJ:
        offs_k, k_mask, col = patch_cols(k0, K, C, PH, PW, 1, PW * C, C, False, True, BLOCK_K)
    else:
        offs_k, k_mask, col = patch_cols(k0, K, C, PH, PW, 1, PW * C, C, True, False, BLOCK_K)
    return col


@triton.jit
def load_patches(X, row_off, m_mask, k0, K, C, PH, PW, sxc, sxh, sxw, CIJ: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_K: tl.constexpr,
                 CACHE: tl.constexpr = DEFAULT_CACHE):  # fmt: skip
    """[BLOCK_M, BLOCK_K] tile of flattened patches in ACC, 0 outside the valid range.
    CACHE=".cg" reads through L2, for data this program wrote earlier (second passes)."""
    offs_k, k_mask, col_off = patch_cols(k0, K, C, PH, PW, sxc, sxh, sxw, False, CIJ, BLOCK_K)
    mask = m_mask[:, None] & k_mask[None, :]
    tile = tl.load(X + row_off[:, None] + col_off[None, :], mask=mask, other=0.0,
                   cache_modifier=CACHE)  # fmt: skip
    return tile.to(ACC), offs_k, k_mask, mask


@triton.jit
def patch_stats(X, row_off, m_mask, K, C, PH, PW, sxc, sxh, sxw, CIJ: tl.constexpr, eps,
                ACC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Per-token mean and 1/std over the patch, exact two-pass (mean, then centred variance):
    raw 0..255 pixels have |mean| >> std, where E[x^2] - E[x]^2 would cancel. Each pass adds
    whole tiles and reduces across the K lanes once at its end, not on every K step."""
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    p_next, offs_k, k_mask, mask = load_patches(
        X, row_off, m_mask, 0, K, C, PH, PW, sxc, sxh, sxw, CIJ, ACC, BLOCK_K
    )
    for k0 in range(0, K, BLOCK_K):  # prefetching as project_chunk does
        p = p_next
        p_next, offs_k, k_mask, mask = load_patches(
            X, row_off, m_mask, k0 + BLOCK_K, K, C, PH, PW, sxc, sxh, sxw, CIJ, ACC, BLOCK_K
        )
        acc += p
    mean = tl.sum(acc, axis=1) / K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    p_next, offs_k, k_mask, mask = load_patches(
        X, row_off, m_mask, 0, K, C, PH, PW, sxc, sxh, sxw, CIJ, ACC, BLOCK_K
    )
    for k0 in range(0, K, BLOCK_K):
        p = p_next
        valid = (k0 + tl.arange(0, BLOCK_K) < K)[None, :] & m_mask[:, None]
        p_next, offs_k, k_mask, mask = load_patches(
            X, row_off, m_mask, k0 + BLOCK_K, K, C, PH, PW, sxc, sxh, sxw, CIJ, ACC, BLOCK_K
        )
        centred = tl.where(valid, p - mean[:, None], 0.0)
        acc += centred * centred
    return mean, 1.0 / tl.sqrt(tl.sum(acc, axis=1) / K + eps)


@triton.jit
def project_chunk(X, W, Bias, G1, B1, row_off, m_mask, mean1, rstd1, n0, K, KW, D, C, PH, PW,
                  sxc, sxh, sxw, swd, swc, swi, swj,
                  PRE_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                  W_FLAT: tl.constexpr, CIJ: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Z[:, n0 : n0 + BLOCK_N] = LayerNorm_K(patches) @ W.T + bias for BLOCK_M tokens, in ACC.

    W is read through strides (d, c, i, j), so a Linear weight (D, K) and a Conv2d weight
    (D, C, ph, pw) are both used in place; the pre-norm parameters G1, B1 come in the K order
    (the launcher re-lays them for CIJ). W rows are readable up to KW >= K, zero beyond K: a
    re-laid weight pads them to a multiple of 16, so that the masks, like the rows, are
    16-element aligned and its tiles load as vectors; the patch tile is 0 beyond K anyway. The
    GEMM operands are rounded to COMPUTE_DTYPE and accumulated in ACC on tensor cores; under
    the interpreter the products run in ACC (its bf16 tl.dot is wrong)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    # Software prefetch: the next K tile is gathered before this one is used, so the gather's
    # latency overlaps the normalisation and tensor-core product (Triton pipelines only loads
    # that feed tl.dot unchanged; these are normalised in registers first).
    a_next, offs_k, k_mask, a_mask = load_patches(
        X, row_off, m_mask, 0, K, C, PH, PW, sxc, sxh, sxw, CIJ, ACC, BLOCK_K
    )
    for k0 in range(0, K, BLOCK_K):
        a = a_next
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a_next, offs_next, k_mask_next, a_mask_next = load_patches(
            X, row_off, m_mask, k0 + BLOCK_K, K, C, PH, PW, sxc, sxh, sxw, CIJ, ACC, BLOCK_K
        )
        if PRE_NORM:
            g1 = tl.load(G1 + offs_k, mask=k_mask, other=0.0).to(ACC)
            b1 = tl.load(B1 + offs_k, mask=k_mask, other=0.0).to(ACC)
            a = (a - mean1[:, None]) * rstd1[:, None] * g1[None, :] + b1[None, :]
        w_k, w_kmask, w_col = patch_cols(k0, K, C, PH, PW, swc, swi, swj, W_FLAT, CIJ, BLOCK_K)
        w_ptrs = W + offs_n[None, :].to(tl.int64) * swd + w_col[:, None]
        w = tl.load(w_ptrs, mask=(offs_k < KW)[:, None] & n_mask[None, :], other=0.0)
        acc = mma(acc, a, w, COMPUTE_DTYPE, DOT_PRECISION, ACC, INTERPRETED)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
    return acc, offs_n, n_mask


@triton.jit
def store_patches(DX, row_off, m_mask, tile, k0, K, C, PH, PW, stride_c, stride_h, stride_w,
                  CIJ: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Scatter a [BLOCK_M, BLOCK_K] tile of flattened patches back into image layout."""
    offs_k, k_mask, col_off = patch_cols(
        k0, K, C, PH, PW, stride_c, stride_h, stride_w, False, CIJ, BLOCK_K
    )
    mask = m_mask[:, None] & k_mask[None, :]
    out = cast(tile, DX.dtype.element_ty, INTERPRETED)
    tl.store(DX + row_off[:, None] + col_off[None, :], out, mask=mask)
