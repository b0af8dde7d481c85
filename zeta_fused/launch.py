"""Launch code for the fused Triton kernels: shape checks, allocation and grids; no math.

Imported lazily (it imports Triton), only when a fused call actually runs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton.language as tl
from torch import Tensor

from .dispatch import interpreting
from .kernels.configs import blocks_for
from .kernels.patch_embed_bwd import (
    _bwd_dw_kernel,
    _bwd_dx_kernel,
    _bwd_dz_kernel,
    _bwd_param_kernel,
)
from .kernels.patch_embed_fwd import _patch_embed_fwd_kernel
from .op_args import BwdArgs, FwdArgs, Grads, fwd_of
from .reference import absent_grad, stats_dtype

# tl.dot needs every block dimension >= 16.
MIN_BLOCK = 16
# Forward grids of fewer 64-token programs than this (a quarter of an H100/H200's 132 SMs) use
# 16-token programs: the b1 preset (196 tokens) runs on 13 SMs instead of 4.
SMALL_GRID = 33
# Calls with at least this many tokens (the 64-token programs of SMALL_GRID) re-lay the weight
# and the pre-norm parameters for the kernels (see _k_order): up to three small copies, which
# the b1 preset would feel in host time but a training batch does not.
RELAYOUT_MIN_TOKENS = SMALL_GRID * 64
# The kernels that read the weight walk K in (c, i, j) order only for power-of-two patch
# widths, whose pixel runs vectorise (bench.tune times the alternative for patch 14).
CIJ_ANY_WIDTH = False
# Row alignment (elements) of a re-laid weight: 16 elements hold a 16-byte vector in any
# dtype, and Triton hints divisibility by 16.
W_ROW_ALIGN = 16
# Alignment hint (elements) of token offsets: 16 covers a 16-byte vector of any dtype.
MAX_ROW_ALIGN = 16
# Tokens are indexed in 32 bits (their divisions would otherwise be slow 64-bit calls), and
# the statistics buffer (4, M) is addressed as k * M + m: 4 * M must fit in an int32.
MAX_TOKENS = 2**31 // 4
# Programs wanted for the dW GEMM (reduction over all tokens): about two waves on the 132 SMs
# of an H100/H200, one 256-row program resident per SM. More splits only add partials: at
# vit_b16 this gives 7 splits, 16.5 MB of fp32 partials.
DW_TARGET_PROGRAMS = 264
# Cap of the dW partial buffer (token splits x D x K in fp32).
DW_PARTIAL_BYTES = 64 << 20
# Cap of the token splits: each writes a whole D x K partial that the second stage reads back;
# on the seed preset (D x K = 64 x 48) 128 splits give 1.5 MB of partials against 22 MB of
# GEMM operands, and each split still runs a dozen 64-token steps.
DW_MAX_SPLITS = 128

TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


# Triton decides at decoration time (the imports above) whether the kernels run interpreted,
# so the flag is read once with them, not on every launch.
INTERPRETED = interpreting()


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls run in TF32. torch >= 2.9's ``fp32_precision`` reflects
    both its own setter and the legacy ones (``allow_tf32``, ``set_float32_matmul_precision``);
    reading ``allow_tf32`` raises once a program has used the new API, so it is only the
    fallback for older torch."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:
        return matmul.allow_tf32


def _numerics(compute_dtype: torch.dtype) -> dict:
    """Constexprs shared by every kernel: GEMM dtype and precision, accumulation dtype.
    fp32 GEMMs follow torch's matmul precision: TF32 only when torch allows it."""
    tf32 = compute_dtype == torch.float32 and tf32_allowed()
    return _numerics_for(compute_dtype, tf32)


@functools.cache
def _numerics_for(compute_dtype: torch.dtype, tf32: bool) -> dict:
    return {
        "COMPUTE_DTYPE": TL_DTYPES[compute_dtype],
        "DOT_PRECISION": "tf32" if tf32 else "ieee",
        "ACC": TL_DTYPES[stats_dtype(compute_dtype)],
        "INTERPRETED": INTERPRETED,
    }


# Plain-int versions of triton.cdiv / next_power_of_2, which Triton 3.8 wraps in a ~2 us
# constexpr-function call: the launchers run on every module call.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _weight_strides(weight: Tensor, chans: int, pw: int) -> tuple[int, int, int, int]:
    """Strides (d, c, i, j) of a Linear weight (D, K), k = (i * pw + j) * C + c, or of a
    Conv2d weight (D, C, ph, pw): the kernels read either in place."""
    if weight.ndim == 4:
        return weight.stride()
    sd, sk = weight.stride()
    return sd, sk, pw * chans * sk, chans * sk


def _flat_in(strides: tuple[int, ...], chans: int, ph: int, pw: int, cij: bool) -> bool:
    """Whether an operand with (d, c, i, j) strides holds the patch axis contiguously in the
    kernels' K order, (c, i, j) with ``cij`` else (i, j, c): then it is read as one run."""
    _, sc, si, sj = strides  # a stride along a dimension of size 1 never matters
    if cij:
        return (chans == 1 or sc == ph * pw) and (ph == 1 or si == pw) and (pw == 1 or sj == 1)
    return (chans == 1 or sc == 1) and (ph == 1 or si == pw * chans) and (pw == 1 or sj == chans)


class KOrder(NamedTuple):
    """How the kernels that read the weight walk the patch, and the operands to give them."""

    cij: bool  # (c, i, j) order, pixel rows innermost, else (i, j, c)
    weight: Tensor  # the weight, or a copy re-laid in the (c, i, j) order
    w_strides: tuple[int, int, int, int]
    w_flat: bool
    kw: int  # readable length of the weight's rows: K, or the zero-padded rows of a copy
    g1: Tensor | None  # pre-norm parameters in the K order (copies for CIJ)
    b1: Tensor | None


def _k_order(x: Tensor, weight: Tensor, g1: Tensor | None, b1: Tensor | None, ph: int,
             pw: int) -> KOrder:  # fmt: skip
    """The (c, i, j) order gathers an NCHW image in runs of pw pixels (vector loads) instead of
    single elements (each of which can touch its own cache line); the runs vectorise when pw
    is a power of two. The order needs the weight and the pre-norm parameters in it too: a
    Conv2d weight already is, and with no pre-norm nothing is copied; otherwise the weight and
    parameters are re-laid (one small copy each) when the call is large enough for that to
    pay. Large calls also re-lay a weight whose rows are not 16-element aligned (K = 588 for
    patch 14), so that its tiles load as 16-byte asynchronous copies. From the sm_90 machine
    code (bf16): a vit_b16 forward K step takes 113 instructions in (c, i, j) order against 166
    in (i, j, c) without a pre-norm, 199 against 208 with one, and its statistics passes 130
    against 186 per K step; vit_l14's K step takes 209 with aligned rows against 291."""
    chans, tokens = x.shape[1], x.shape[0] * (x.shape[2] // ph) * (x.shape[3] // pw)
    large = tokens >= RELAYOUT_MIN_TOKENS
    w_strides = _weight_strides(weight, chans, pw)
    cij = _rows_inner(x) and (CIJ_ANY_WIDTH or pw & (pw - 1) == 0)
    cij = cij and (large or (g1 is None and _flat_in(w_strides, chans, ph, pw, cij=True)))
    flat, kw = _flat_in(w_strides, chans, ph, pw, cij), chans * ph * pw
    if large and not (flat and w_strides[0] % W_ROW_ALIGN == 0 and kw % W_ROW_ALIGN == 0):
        weight = _relaid(weight, chans, ph, pw, cij)
        w_strides, flat, kw = _weight_strides(weight, chans, pw), True, weight.stride(0)
    if cij and g1 is not None:
        g1, b1 = (p.reshape(ph, pw, chans).permute(2, 0, 1).reshape(-1) for p in (g1, b1))
    return KOrder(cij, weight, w_strides, flat, kw, g1, b1)


def _relaid(weight: Tensor, chans: int, ph: int, pw: int, cij: bool) -> Tensor:
    """A copy of a Linear (D, K) or Conv2d weight holding each row contiguously in the K order
    ((c, i, j) with ``cij``, else (i, j, c)), rows W_ROW_ALIGN-element aligned and zero-padded:
    a (D, C, ph, pw) or a (D, K) view of the row-padded buffer."""
    d, k = weight.shape[0], chans * ph * pw
    dijc = weight.reshape(d, ph, pw, chans) if weight.ndim == 2 else weight.permute(0, 2, 3, 1)
    rows = weight.new_zeros((d, _cdiv(k, W_ROW_ALIGN) * W_ROW_ALIGN))[:, :k]
    if cij:
        out = rows.view(d, chans, ph, pw)
        out.copy_(dijc.permute(0, 3, 1, 2))
        return out
    rows.view(d, ph, pw, chans).copy_(dijc)
    return rows


def _row_align(x: Tensor, ph: int, pw: int) -> int:
    """The largest power of two (at most MAX_ROW_ALIGN) dividing every token's first-pixel
    offset b * sb + ti * ph * sh + tj * pw * sw."""
    g = math.gcd(x.stride(0), ph * x.stride(2), pw * x.stride(3)) or MAX_ROW_ALIGN
    return min(g & -g, MAX_ROW_ALIGN)


def _rows_inner(x: Tensor) -> bool:
    """Pixel rows contiguous and more than one channel: the (c, i, j) order pays."""
    return x.shape[1] > 1 and x.stride(3) == 1


def _token_strides(t: Tensor) -> tuple[int, int, int, bool]:
    """Strides (b, n, d) of a (B, N, D) tensor, and whether its token rows are evenly spaced
    (then the kernels index them without dividing by N)."""
    sb, sn, sd = t.stride()
    return sb, sn, sd, t.shape[0] <= 1 or sb == t.shape[1] * sn


def on_tensor_device(launcher):
    """Triton launches on the current CUDA device and its stream. A call whose tensors live on
    another GPU (``model.to("cuda:1")`` without ``torch.cuda.set_device``, as eager torch ops
    allow) switches to their device for its duration instead of faulting."""

    @functools.wraps(launcher)
    def on_device(args):
        x = args.x
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(args)
        return launcher(args)

    return on_device


def _block_n(dim: int, cap: int) -> int:
    return min(max(_next_power_of_2(dim), MIN_BLOCK), cap)


@on_tensor_device
def patch_embed_fwd(args: FwdArgs) -> tuple[Tensor, Tensor]:
    """Run the fused forward; returns y (B, N, D) and the row statistics (4, B*N)."""
    x, weight, bias, g1, b1, g2, b2 = (
        args.x,
        args.weight,
        args.bias,
        args.g1,
        args.b1,
        args.g2,
        args.b2,
    )
    (ph, pw), eps, compute_dtype, out_dtype = (
        args.patch,
        args.eps,
        args.compute_dtype,
        args.out_dtype,
    )
    batch, chans, height, width = x.shape
    dim, patch_dim = weight.shape[0], chans * ph * pw
    hp, wp = height // ph, width // pw
    tokens = batch * hp * wp
    if tokens >= MAX_TOKENS:
        raise ValueError(
            f"{tokens} tokens (batch {batch} x {hp * wp} patches): the fused kernels take at "
            f"most {MAX_TOKENS - 1} per call; split the batch"
        )
    y = x.new_empty((batch, hp * wp, dim), dtype=out_dtype)
    stats = x.new_empty((4, tokens), dtype=stats_dtype(compute_dtype))
    if tokens == 0:
        return y, stats
    blocks = blocks_for(compute_dtype.itemsize)
    block_n = _block_n(dim, blocks.n)
    # Small batches: each program walks all of K and D in sequence, so with few programs the
    # call takes one program's latency; the smallest tensor-core tile spreads them wider.
    block_m = blocks.m if _cdiv(tokens, blocks.m) >= SMALL_GRID else MIN_BLOCK
    k = _k_order(x, weight, g1, b1, ph, pw)
    _patch_embed_fwd_kernel[(_cdiv(tokens, block_m),)](
        x, k.weight, _or(bias, weight), _or(k.g1, weight), _or(k.b1, weight), _or(g2, weight),
        _or(b2, weight), y, stats,
        tokens, patch_dim, k.kw, dim, chans, ph, pw, hp * wp, wp, *x.stride(), *k.w_strides,
        eps,
        PRE_NORM=g1 is not None, HAS_BIAS=bias is not None, POST_NORM=g2 is not None,
        ROW_IN_ONE_TILE=block_n >= dim, W_FLAT=k.w_flat, CIJ=k.cij, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=blocks.k, num_warps=blocks.warps, **_numerics(compute_dtype),
    )  # fmt: skip
    return y, stats


@on_tensor_device
def patch_embed_bwd(args: BwdArgs) -> Grads:
    """Run the fused backward; returns every gradient, absent ones empty."""
    grad_y, stats, needs_x_grad = args.grad_y, args.stats, args.needs_x_grad
    a = fwd_of(args)
    x, weight, bias, g1, b1, g2 = a.x, a.weight, a.bias, a.g1, a.b1, a.g2
    (ph, pw), compute_dtype = a.patch, a.compute_dtype
    batch, chans, height, width = x.shape
    dim, patch_dim = weight.shape[0], chans * ph * pw
    hp, wp = height // ph, width // pw
    tokens = batch * hp * wp
    w_strides = _weight_strides(weight, chans, pw)
    k = _k_order(x, weight, g1, b1, ph, pw)  # for the dZ and image-gradient kernels
    pre, post = g1 is not None, g2 is not None
    acc = stats.dtype
    numerics = _numerics(compute_dtype)
    shape = (tokens, patch_dim, dim, chans, ph, pw, hp * wp, wp)
    k_shape = (tokens, patch_dim, k.kw, *shape[2:])  # the kernels that read the weight
    blocks = blocks_for(compute_dtype.itemsize)
    m_tiles, dz_tiles = _cdiv(tokens, blocks.m), _cdiv(tokens, blocks.dz_m)

    # 1. dZ and the column partials of dZ, dY * ẑ, dY.
    partials = _scratch(x, (3, max(dz_tiles, 1), dim), acc, zero=tokens == 0)
    row_offsets = x.new_empty((tokens,), dtype=torch.int64)
    dz = x.new_empty((batch, hp * wp, dim), dtype=compute_dtype) if post else grad_y
    if tokens:
        _bwd_dz_kernel[(dz_tiles,)](
            x, k.weight, _or(bias, weight), _or(k.g1, weight), _or(k.b1, weight),
            _or(g2, weight), stats, grad_y, dz, partials, row_offsets, *k_shape, *x.stride(),
            *k.w_strides, *_token_strides(grad_y),
            PRE_NORM=pre, HAS_BIAS=bias is not None, POST_NORM=post, W_FLAT=k.w_flat, CIJ=k.cij,
            BLOCK_M=blocks.dz_m, BLOCK_N=_block_n(dim, blocks.dz_n), BLOCK_K=blocks.k,
            num_warps=blocks.warps, **numerics,
        )  # fmt: skip
    # Second, deterministic stage of the column reductions (each sum is a fresh tensor).
    dzsum = partials[0].sum(0)

    # 2. All parameter gradients from G = dZ^T x̂.
    dw_d = _block_n(dim, blocks.dw_d)  # narrow D (seed: 64) wastes no tensor-core rows
    d_tiles, k_tiles = _cdiv(dim, dw_d), _cdiv(patch_dim, blocks.tile)
    max_splits = min(DW_MAX_SPLITS, DW_PARTIAL_BYTES // (dim * patch_dim * acc.itemsize))
    dw_steps = _cdiv(tokens, blocks.dw_m)
    splits = max(1, min(DW_TARGET_PROGRAMS // (d_tiles * k_tiles), dw_steps, max_splits))
    gpart = _scratch(x, (splits, dim, patch_dim), acc, zero=tokens == 0)
    # The dW GEMM never reads the weight: the image alone picks its K order (G is kept in it).
    g_cij = _rows_inner(x)
    if tokens:
        _bwd_dw_kernel[(d_tiles, k_tiles, splits)](
            x, stats, row_offsets, dz, gpart, *shape, *x.stride(), *_token_strides(dz),
            PRE_NORM=pre, CIJ=g_cij, ROW_ALIGN=_row_align(x, ph, pw), BLOCK_M=blocks.dw_m,
            BLOCK_D=dw_d, BLOCK_K=blocks.tile, num_warps=blocks.warps, **numerics,
        )  # fmt: skip
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    dg1 = torch.empty_like(g1) if pre else absent_grad(weight)
    db1 = torch.empty_like(b1) if pre else absent_grad(weight)
    # Second stage of the token splits: a fixed-order reduction at full bandwidth.
    gsum = gpart[0] if splits == 1 else gpart.sum(0)
    dw_strides = _weight_strides(dw, chans, pw)
    flat = all(_flat_in(t, chans, ph, pw, g_cij) for t in (w_strides, dw_strides))
    _bwd_param_kernel[(_cdiv(patch_dim, blocks.epilogue_k),)](
        gsum, dzsum, weight, _or(g1, weight), _or(b1, weight), dw, _or(dg1, dw), _or(db1, dw),
        patch_dim, dim, chans, ph, pw, *w_strides, *dw_strides,
        PRE_NORM=pre, ACC=numerics["ACC"], INTERPRETED=INTERPRETED, W_FLAT=flat, CIJ=g_cij,
        BLOCK_D=blocks.tile, BLOCK_K=blocks.epilogue_k, num_warps=blocks.epilogue_warps,
    )  # fmt: skip

    # 3. The image gradient, only when asked for.
    dx = absent_grad(weight)
    if needs_x_grad:
        dx = x.new_empty(x.shape)
        if tokens:
            _bwd_dx_kernel[(m_tiles,)](
                x, k.weight, _or(k.g1, weight), stats, dz, dx, *k_shape, *x.stride(), *dx.stride(),
                *k.w_strides, *_token_strides(dz), PRE_NORM=pre, W_FLAT=k.w_flat, CIJ=k.cij,
                BLOCK_M=blocks.m, BLOCK_D=blocks.tile, BLOCK_K=blocks.dx_k,
                num_warps=blocks.warps, **numerics,
            )  # fmt: skip

    dbias = dzsum.to(bias.dtype) if bias is not None else absent_grad(weight)
    dg2 = partials[1].sum(0).to(g2.dtype) if post else absent_grad(weight)
    db2 = partials[2].sum(0).to(g2.dtype) if post else absent_grad(weight)
    return Grads(dx, dw, dbias, dg1, db1, dg2, db2)


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """A pointer for an absent optional tensor (never read: a constexpr switches it off)."""
    return dummy if t is None else t


def _scratch(like: Tensor, shape: tuple, dtype: torch.dtype, zero: bool) -> Tensor:
    """Partial-sum buffer; the kernels write every element, so it needs zeros only when no
    kernel runs (an empty batch)."""
    return like.new_zeros(shape, dtype=dtype) if zero else like.new_empty(shape, dtype=dtype)
