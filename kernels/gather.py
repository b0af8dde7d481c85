"""Tiles of flattened patches shared by the forward and backward kernels: gather into
registers and scatter back into image layout. Pure @triton.jit functions, no launches."""

import triton
import triton.language as tl

from .geometry import patch_cols, prod
from .rounding import cast

# The default cache policy of tl.load, as a constexpr object: Triton 3.6 cannot compile a call
# that leaves a plain-string constexpr default unbound.
DEFAULT_CACHE = tl.constexpr("")
# Second passes read what the same program stored in an earlier one: through L2 (".cg"), never
# a possibly stale L1 line; the tl.debug_barrier() before them orders the threads.
READ_BACK = tl.constexpr(".cg")


@triton.jit
def load_patches(X, strides, row_off, m_mask, k0, K, C: tl.constexpr, PATCH: tl.constexpr,
                 CHANNELS_FIRST: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
                 CACHE: tl.constexpr = DEFAULT_CACHE):  # fmt: skip
    """[BLOCK_M, BLOCK_K] tile of flattened patches in ACC_DTYPE, 0 outside the valid range.
    CACHE=".cg" reads through L2, for data this program wrote earlier (second passes)."""
    offs_k, k_mask, col_off = patch_cols(k0, K, C, PATCH, strides, False, CHANNELS_FIRST, BLOCK_K)
    mask = m_mask[:, None] & k_mask[None, :]
    tile = tl.load(X + row_off[:, None] + col_off[None, :], mask=mask, other=0.0,
                   cache_modifier=CACHE)  # fmt: skip
    return tile.to(ACC_DTYPE), offs_k, k_mask, mask


@triton.jit
def raw_patches(X, strides, row_off, m_mask, k0, K, C: tl.constexpr, PATCH: tl.constexpr,
                EVEN_K: tl.constexpr, X_RUN: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """[rows, BLOCK_K] tile of flattened patches as stored, 0 outside: a tile that reaches
    tl.dot unchanged is streamed through shared memory by asynchronous copies, and the
    tensor-core products stay in flight across steps (docs/design.md, "Forward main loop").
    Returns it with offs_k and the column mask. EVEN_K: K is a multiple of BLOCK_K (no column
    mask: the loads vectorise over whole rows); else the mask uses the compile-time K, which the
    compiler sees constant along each run. X_RUN: the patch elements come in contiguous runs of
    X_RUN (a power of two) in the K order, each starting at a multiple of X_RUN elements (what
    the compiler cannot see for runs that are not a power of two; the launcher checks the
    strides)."""
    offs_k, k_mask, col_off = patch_cols(k0, K, C, PATCH, strides, False, CHANNELS_FIRST, BLOCK_K)
    if X_RUN > 1:
        col_off = tl.max_contiguous(tl.multiple_of(col_off, X_RUN), X_RUN)
    if EVEN_K:
        k_mask = offs_k >= 0
    else:
        k_mask = offs_k < C * prod(PATCH)
    tile = tl.load(X + row_off[:, None] + col_off[None, :],
                   mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
    return tile, offs_k, k_mask


@triton.jit
def store_patches(DX, strides, row_off, m_mask, tile, k0, K, C: tl.constexpr,
                  PATCH: tl.constexpr, CHANNELS_FIRST: tl.constexpr, EMULATE_BF16: tl.constexpr,
                  BLOCK_K: tl.constexpr):  # fmt: skip
    """Scatter a [BLOCK_M, BLOCK_K] tile of flattened patches back into image layout."""
    _offs_k, k_mask, col_off = patch_cols(k0, K, C, PATCH, strides, False, CHANNELS_FIRST,
                                          BLOCK_K)  # fmt: skip
    mask = m_mask[:, None] & k_mask[None, :]
    out = cast(tile, DX.dtype.element_ty, EMULATE_BF16)
    tl.store(DX + row_off[:, None] + col_off[None, :], out, mask=mask)
