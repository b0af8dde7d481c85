"""Patch geometry on the device (docs/design.md, "Patch geometry"): token -> (image, grid
position) -> offset of its first pixel, and patch element -> (channel, in-patch offsets) ->
element offset. The number of spatial dimensions is the length of the constexpr PATCH tuple,
so one code path serves sequences, images and volumes; a dimension of size 1 (a patch size, or
a grid extent, which Triton specialises to a constant when it is 1) folds away at compile
time. Pure @triton.jit functions, no launches.

Strides of an operand indexed by patch elements come as a tuple ``(c, *spatial)``; its lead
stride (batch of an image, row of a weight) is a separate argument.
"""

import triton
import triton.language as tl


@triton.jit
def token_rows(m_start, M, rows, grid, Keep, PATCH: tl.constexpr, stride_b, strides,
               BLOCK_M: tl.constexpr):  # fmt: skip
    """Output rows m_start .. m_start + BLOCK_M of the patch tokens (row m: image m // rows)
    and the grid position each holds: m % rows without Keep (every patch, in grid order, last
    dimension fastest), else Keep's entry m (Keep: (B, rows) int64, contiguous). Returns the
    int64 row index, its mask, the offset of each token's first pixel in an operand with batch
    stride stride_b and element strides (c, *spatial), and the int32 grid position (for the
    position table). The row index is divided in 32 bits (the launcher keeps M < 2**31): a
    64-bit division is a slow call."""
    tok, offs_m, m_mask, position = token_positions(m_start, M, rows, Keep, BLOCK_M)
    row_off = (tok // rows).to(tl.int64) * stride_b + patch_origin(position, grid, PATCH,
                                                                   strides)  # fmt: skip
    return offs_m, m_mask, row_off, position


@triton.jit
def token_positions(m_start, M, rows, Keep, BLOCK_M: tl.constexpr):
    """Output rows m_start .. m_start + BLOCK_M of the patch tokens: the int32 and int64 row
    index, its mask, and the grid position each holds (see token_rows)."""
    tok = m_start.to(tl.int32) + tl.arange(0, BLOCK_M)
    offs_m = tok.to(tl.int64)
    m_mask = offs_m < M
    if Keep is None:
        position = tok % rows
    else:
        position = tl.load(Keep + offs_m, mask=m_mask, other=0).to(tl.int32)
    return tok, offs_m, m_mask, position


@triton.jit
def patch_origin(position, grid, PATCH: tl.constexpr, strides):
    """Offset, within its image, of the first pixel of the patch at each grid position."""
    origin = tl.zeros(position.shape, dtype=tl.int64)
    for d in tl.static_range(len(PATCH)):
        # Grid position along d: position // (patches in the dims inside it) % grid[d], the
        # outermost unwrapped; the terms are added outermost first.
        inner = 1
        for e in tl.static_range(d + 1, len(PATCH)):
            inner = inner * grid[e]
        along = position // inner
        if d > 0:
            along = along % grid[d]
        origin += along.to(tl.int64) * (PATCH[d] * strides[1 + d])
    return origin


@triton.jit
def token_offsets(offs_m, rows, strides, FLAT: tl.constexpr):
    """Offsets of token rows in a (B, rows, D) tensor with strides (b, n, d), stride 0
    included. FLAT: b stride == rows * n stride (contiguous or fully expanded), so no division
    is needed."""
    if FLAT:
        return offs_m * strides[1]
    tok = offs_m.to(tl.int32)  # 32-bit division, as token_rows
    return (tok // rows).to(tl.int64) * strides[0] + (tok % rows).to(tl.int64) * strides[1]


@triton.jit
def patch_cols(k0, K, C: tl.constexpr, PATCH: tl.constexpr, strides, FLAT: tl.constexpr,
               CHANNELS_FIRST: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Patch elements k0 .. k0 + BLOCK_K in the kernels' K order: index, mask, element offset.

    The order is (*patch, c), the flattened-patch order of a Linear projection weight (k =
    (i * pw + j) * C + c for images); CHANNELS_FIRST gives (c, *patch), the order of a conv
    weight, pixel rows innermost, so that a contiguous image yields runs of contiguous pixels
    and the gather vectorises. Any order gives the same GEMM as long as every operand of one
    product is read in it. FLAT: the operand holds the elements contiguously in this order
    (its offset is k itself), which the compiler can see: the loads vectorise."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if FLAT:
        col_off = offs_k.to(tl.int64)
    else:
        # Each index is (k // elements of the dims inside it) % its size, the outermost dim
        # unwrapped; the terms are added outermost first.
        inner = C
        for d in tl.static_range(len(PATCH)):
            inner = inner * PATCH[d]
        if CHANNELS_FIRST:  # (c, *patch)
            inner = inner // C
            col_off = (offs_k // inner).to(tl.int64) * strides[0]
            for d in tl.static_range(len(PATCH)):
                inner = inner // PATCH[d]
                col_off += ((offs_k // inner) % PATCH[d]).to(tl.int64) * strides[1 + d]
        else:  # (*patch, c)
            col_off = (offs_k % C).to(tl.int64) * strides[0]
            inner = inner // PATCH[0]
            col_off += (offs_k // inner).to(tl.int64) * strides[1]
            for d in tl.static_range(1, len(PATCH)):
                inner = inner // PATCH[d]
                col_off += ((offs_k // inner) % PATCH[d]).to(tl.int64) * strides[1 + d]
    return offs_k, k_mask, col_off


@triton.jit
def prod(sizes: tl.constexpr):
    """The product of a constexpr tuple (a patch's elements per channel)."""
    out = 1
    for d in tl.static_range(len(sizes)):
        out = out * sizes[d]
    return out


@triton.jit
def table_rows(position, PosIndex, offs_m, m_mask):
    """The position-table row of each token: its grid position, or PosIndex's entry for its
    output row (PosIndex: (B, rows) int64, contiguous; packed and variable-resolution rows)."""
    rows = position
    if PosIndex is not None:
        rows = tl.load(PosIndex + offs_m, mask=m_mask, other=0).to(tl.int32)
    return rows
