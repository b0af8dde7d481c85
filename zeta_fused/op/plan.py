"""The integer-only decisions of a fused call (docs/design.md, "Forward main loop"): the
forward's tiles and grid, block widths, and the constexprs every GEMM kernel shares. Cached
where they depend on integers only: a lookup on the per-call path."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton.language as tl

from ..kernels.contract import NO_NORM
from . import layout
from .args import FwdArgs
from .policy import Blocks, LaunchPolicy
from .reference import stats_dtype

# tl.dot needs every block dimension >= 16.
MIN_BLOCK = 16

TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


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


def numerics(compute_dtype: torch.dtype, pol: LaunchPolicy) -> dict:
    """Constexprs shared by every GEMM kernel: operand dtype and precision, accumulation dtype,
    bf16 emulation. fp32 GEMMs follow torch's matmul precision: TF32 only when torch allows it."""
    tf32 = compute_dtype == torch.float32 and tf32_allowed()
    return _numerics_for(compute_dtype, tf32, pol.emulate_bf16)


@functools.cache
def _numerics_for(compute_dtype: torch.dtype, tf32: bool, emulate_bf16: bool) -> dict:
    return {
        "COMPUTE_DTYPE": TL_DTYPES[compute_dtype],
        "DOT_PRECISION": "tf32" if tf32 else "ieee",
        "ACC_DTYPE": TL_DTYPES[stats_dtype(compute_dtype)],
        "EMULATE_BF16": emulate_bf16,
    }


# Plain-int versions of triton.cdiv / next_power_of_2, which Triton 3.8 wraps in a ~2 us
# constexpr-function call: the launchers run on every module call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=256)  # integers only: a lookup on the per-call path, not 3 calls
def block_width(dim: int, cap: int) -> int:
    return min(max(next_power_of_2(dim), MIN_BLOCK), cap)


class FwdPlan(NamedTuple):
    """Tiles and grid of a folded forward (kernels/patch_embed_fwd.py)."""

    block_m: int
    block_n: int
    pair: bool  # column tiles two at a time (PAIR)
    warps: int
    row_blocks: int
    splits: int  # programs per row block, each with tiles_per_program column tiles
    tiles_per_program: int


@functools.lru_cache(maxsize=256)  # integers only: a lookup on the per-call path
def fwd_plan(tokens: int, dim: int, blocks: Blocks, small_grid: int, target: int) -> FwdPlan:
    """Wide tiles, one program per row block owning every column of it, where the row blocks
    fill the GPU (at least ``small_grid`` of them); else small tiles, the column tiles of each
    row block split across programs until about ``target`` programs run."""
    block_m, block_n = blocks.fwd_m, block_width(dim, blocks.fwd_n)
    row_blocks = cdiv(tokens, block_m)
    if row_blocks >= small_grid:
        n_tiles = cdiv(dim, block_n)
        return FwdPlan(block_m, block_n, blocks.fwd_pair and n_tiles > 1, blocks.fwd_warps,
                       row_blocks, 1, n_tiles)  # fmt: skip
    block_m, block_n = blocks.fwd_small_m, block_width(dim, blocks.fwd_small_n)
    row_blocks = cdiv(tokens, block_m)
    n_tiles = cdiv(dim, block_n)
    tiles = cdiv(n_tiles, max(1, min(n_tiles, target // row_blocks)))
    return FwdPlan(block_m, block_n, False, blocks.fwd_small_warps, row_blocks,
                   cdiv(n_tiles, tiles), tiles)  # fmt: skip


def plain_gemm(a: FwdArgs, geo: layout.Geometry) -> bool:
    """Nothing to fuse: one patch per input, already laid out as the weight's rows (the rows of
    Qwen2/2.5/3-VL vision towers), no norm, table, prefix rows or keep index, one dtype. The
    op is then the GEMM itself, which cuBLAS runs at its ceiling (docs/design.md, "Forward
    main loop")."""
    w, x = a.weight, a.x
    if (a.pre_norm, a.post_norm, a.stem_norm) != (NO_NORM, NO_NORM, NO_NORM) or geo.per_image != 1:
        return False
    if a.pos is not None or a.prefix is not None or a.keep is not None:
        return False
    if not x.dtype == w.dtype == a.compute_dtype == a.out_dtype:
        return False
    channels_first = w.ndim > 2  # a conv weight's K order; a Linear's is (*patch, c)
    strides = layout.element_strides(w, geo.chans, geo.patch)
    flat = layout.flat_in(strides, geo.chans, geo.patch, channels_first)
    rows = layout.flat_in(x.stride()[1:], geo.chans, geo.patch, channels_first)
    return flat and rows
