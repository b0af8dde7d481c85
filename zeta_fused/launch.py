"""Launch code for the fused Triton kernels: shape checks, allocation and grids; no math.

Imported lazily (it imports Triton), only when a fused call actually runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import interpreting
from .kernels.patch_embed_fwd import _patch_embed_fwd_kernel
from .reference import stats_dtype

# Tokens per program: one tensor-core M tile; the fp32 accumulator of BLOCK_M x BLOCK_N must fit
# in registers next to the operand tiles.
BLOCK_M = 64
# Patch elements per K step: K = 588 (14x14x3) becomes 19 masked steps, no padding to 1024.
BLOCK_K = 32
# Widest output tile kept in registers; wider rows are normalised by an in-program second pass.
MAX_BLOCK_N = 256
# tl.dot needs every block dimension >= 16.
MIN_BLOCK = 16
# Output tiles at or above this width get 8 warps (register pressure of the fp32 accumulator).
WIDE_TILE = 256

TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def _fp32_dot_precision() -> str:
    """fp32 GEMMs follow torch's matmul precision: TF32 only when torch allows it."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def patch_embed_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    g1: Tensor | None,
    b1: Tensor | None,
    g2: Tensor | None,
    b2: Tensor | None,
    ph: int,
    pw: int,
    eps: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Run the fused forward; returns y (B, N, D) and the row statistics (4, B*N)."""
    batch, chans, height, width = x.shape
    dim, patch_dim = weight.shape
    hp, wp = height // ph, width // pw
    tokens = batch * hp * wp
    y = x.new_empty((batch, hp * wp, dim), dtype=out_dtype)
    stats = x.new_empty((4, tokens), dtype=stats_dtype(compute_dtype))
    if tokens == 0:
        return y, stats
    block_n = min(max(triton.next_power_of_2(dim), MIN_BLOCK), MAX_BLOCK_N)
    pre_norm, post_norm = g1 is not None, g2 is not None
    grid = (triton.cdiv(tokens, BLOCK_M),)
    _patch_embed_fwd_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        g1 if pre_norm else weight,
        b1 if pre_norm else weight,
        g2 if post_norm else weight,
        b2 if post_norm else weight,
        y,
        stats,
        tokens,
        patch_dim,
        dim,
        chans,
        ph,
        pw,
        hp * wp,
        wp,
        *x.stride(),
        *weight.stride(),
        eps,
        PRE_NORM=pre_norm,
        HAS_BIAS=bias is not None,
        POST_NORM=post_norm,
        COMPUTE_DTYPE=TL_DTYPES[compute_dtype],
        DOT_PRECISION=_fp32_dot_precision() if compute_dtype == torch.float32 else "ieee",
        ACC=TL_DTYPES[stats.dtype],
        INTERPRETED=interpreting(),
        ROW_IN_ONE_TILE=block_n >= dim,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK_K,
        num_warps=8 if block_n >= WIDE_TILE else 4,
    )
    return y, stats
