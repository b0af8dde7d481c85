"""The backward's launchers (docs/design.md, "Backward"): the decisions of a call, the buffers
its kernels share, and one small launcher per kernel. Each launcher takes the kernel it
launches: :mod:`.launch` holds the kernels (tests and the perf probes find and swap them
there) and runs the call (``launch.patch_embed_bwd``).

No torch op besides allocation runs here for a call without prefix rows or token subsets:
the second stage of every sum and the casts to the parameters' dtypes happen in the dW kernel.
Prefix rows (a (P, D) problem, eager math from :mod:`.reference`) and token subsets (the
segment sums of :mod:`.launch`) add theirs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ..kernels.contract import COLUMN_SUMS, LAYER_NORM, NO_NORM
from . import bound, layout
from .args import BwdArgs, FwdArgs, fwd_of
from .plan import block_width, cdiv, numerics
from .policy import Blocks, LaunchPolicy
from .reference import prefix_grads


class DwPlan(NamedTuple):
    """Tiles and grid of the dW kernel's GEMM (integers only)."""

    block_d: int  # D rows of a weight tile (narrow D wastes no tensor-core rows)
    d_tiles: int
    k_tiles: int
    splits: int  # token splits per weight tile, each summing into its own slot
    chunk: int  # token tiles per chunk of the centred fold
    v_rows: int  # tokens per group of the dZ kernel's centring sums


@functools.lru_cache(maxsize=256)  # integers only: a lookup on the per-call path
def dw_plan(tokens: int, dim: int, patch_dim: int, blocks: Blocks, pol: LaunchPolicy,
            acc_bytes: int) -> DwPlan:  # fmt: skip
    block_d = block_width(dim, blocks.dw_d)
    d_tiles, k_tiles = cdiv(dim, block_d), cdiv(patch_dim, blocks.dw_k)
    max_splits = min(pol.dw_max_splits, pol.dw_partial_bytes // (dim * patch_dim * acc_bytes))
    steps = cdiv(tokens, blocks.dw_m)
    splits = max(1, min(pol.dw_target_programs // (d_tiles * k_tiles), steps, max_splits))
    chunk = max(1, pol.dw_chunk_tokens // blocks.dw_m)
    return DwPlan(block_d, d_tiles, k_tiles, splits, chunk, min(blocks.dz_m, blocks.dw_m))


class BwdCall(NamedTuple):
    """A backward call's operands and decisions, and the buffers the dZ kernel writes for the
    others."""

    args: BwdArgs
    a: FwdArgs
    pol: LaunchPolicy
    blocks: Blocks
    consts: dict  # constexprs of every GEMM kernel (numerics, channels, patch, pre-norm)
    geo: layout.Geometry
    k: layout.KOrder  # the K order and operands of the kernels that read the weight
    x_strides: tuple[int, ...]
    rows: int  # patch tokens per image
    tokens: int
    grad_tokens: Tensor  # the patch tokens' rows of the upstream gradient
    fold: bool  # the dW GEMM takes both operands as stored (kernels/patch_embed_bwd_dw.py)
    dz_scaled: bool  # the dZ buffer holds Ẑ = dZ * rstd1
    centred: bool  # folded with a LayerNorm pre-norm (kernels/patch_embed_bwd_dw.py)
    dw: DwPlan
    dz: Tensor  # the dW and image-gradient GEMMs' operand: the dZ kernel's buffer, or dY
    dt: Tensor | None  # dT for the position table's gradient (dY, the dZ buffer, or its own)
    dt_buffer: Tensor | None  # dT where the dZ kernel writes it
    partials: Tensor  # (COLUMN_SUMS, dZ programs, D) column partials
    x_row_offsets: Tensor
    dz_row_offsets: Tensor | None
    centring: Tensor | None  # (groups, D) sums of Ẑ * mean1 (a centred fold)
    unfit: Tensor | None  # (groups,) flags of groups the fold would cancel on
    counters: Tensor  # the dW kernel's, zeroed by the dZ kernel


def bwd_call(args: BwdArgs, pol: LaunchPolicy, rows: int, tokens: int) -> BwdCall:
    """The call's decisions and the buffers of its dZ kernel."""
    a, grad_y = fwd_of(args), args.grad_y
    x, weight = a.x, a.weight
    geo = layout.geometry(x, a.patch)
    dim = weight.shape[0]
    blocks = pol.blocks(a.compute_dtype.itemsize)
    consts = dict(C=geo.chans, PATCH=geo.patch, NORM1=a.pre_norm, **numerics(a.compute_dtype, pol))
    n_prefix = 0 if a.prefix is None else a.prefix.shape[0]
    grad_tokens = grad_y[:, n_prefix:] if n_prefix else grad_y  # (without prefix: no view op)
    post, stem = a.post_norm != NO_NORM, a.stem_norm != NO_NORM
    # The folded dW GEMM reads the image as stored: 16-bit images in the operand dtype. With a
    # pre-norm, dZ carries its rstd (Ẑ), in bf16 only: fp16 could overflow there.
    fold = pol.dw_fold and x.dtype == a.compute_dtype and x.dtype.itemsize == 2
    fold = fold and (a.pre_norm == NO_NORM or x.dtype == torch.bfloat16)
    dz_scaled = fold and a.pre_norm != NO_NORM
    acc = args.stats.dtype
    plan = dw_plan(tokens, dim, geo.patch_dim, blocks, pol, acc.itemsize)
    shape = grad_tokens.shape
    centred = dz_scaled and a.pre_norm == LAYER_NORM
    dz = grad_tokens
    if post or stem or dz_scaled:
        # (a centred fold reads the tokens it leaves out as a row of zeros after them)
        rows_buffer = x.new_empty((tokens + centred, dim), dtype=a.compute_dtype)
        dz = rows_buffer[:tokens].view(shape)
    # dT, the position table's per-token gradient: dY without a stem norm, the dZ buffer
    # without a post-norm (unless it holds Ẑ), else a buffer the dZ kernel writes.
    own_dt = a.pos is not None and stem and (post or dz_scaled)
    dt_buffer = x.new_empty(shape, dtype=a.compute_dtype) if own_dt else None
    dt = grad_tokens if not stem else dt_buffer if own_dt else dz
    # dZ is dY with rows not evenly spaced (after prefix rows): the dZ kernel stores their
    # offsets for the dW GEMM, which would otherwise divide by N on every step.
    dz_row_offsets = None
    if centred or (dz is grad_tokens and not layout.token_strides(grad_tokens)[1]):
        dz_row_offsets = x.new_empty((tokens,), dtype=torch.int64)
    dz_tiles = cdiv(tokens, blocks.dz_m)
    groups = dz_tiles * (blocks.dz_m // plan.v_rows)
    return BwdCall(
        args, a, pol, blocks, consts, geo, layout.k_order(x, weight, a.g1, a.b1, geo, pol),
        layout.element_strides(x, geo.chans, geo.patch), rows, tokens, grad_tokens, fold,
        dz_scaled, centred, plan, dz, dt, dt_buffer,
        x.new_empty((len(COLUMN_SUMS), min(dz_tiles, pol.dz_programs), dim), dtype=acc),
        x.new_empty((tokens,), dtype=torch.int64), dz_row_offsets,
        x.new_empty((groups, dim), dtype=acc) if centred else None,
        x.new_empty((groups,), dtype=torch.int32) if centred else None,
        x.new_empty((plan.d_tiles * plan.k_tiles + plan.k_tiles,), dtype=torch.int32),
    )  # fmt: skip


def launch_dz(kernel, c: BwdCall) -> None:
    """dZ (or Ẑ) through the norms over D, the column partials and what the dW GEMM reads."""
    a, k, blocks = c.a, c.k, c.blocks
    x = a.x
    dy_strides, dy_flat = layout.token_strides(c.grad_tokens)
    bound.launch(kernel, (c.partials.shape[1],),
        x, x.stride(0), c.x_strides, k.weight, k.weight.stride(0), k.w_strides, k.w_row_len,
        a.bias, (k.g1, k.b1), (a.g2, a.b2), a.pos, a.keep, a.pos_index, (a.g3, a.b3),
        c.args.stats, c.grad_tokens, dy_strides, c.dz, c.dt_buffer, c.partials, c.centring,
        c.unfit, c.x_row_offsets, c.dz_row_offsets, c.counters, c.counters.numel(), c.tokens,
        c.geo.patch_dim, a.weight.shape[0], c.rows, c.geo.grid,
        NORM2=a.post_norm, NORM3=a.stem_norm, DY_FLAT=dy_flat, DZ_SCALED=c.dz_scaled,
        W_FLAT=k.w_flat, CHANNELS_FIRST=k.channels_first, BLOCK_M=blocks.dz_m,
        BLOCK_N=block_width(a.weight.shape[0], blocks.dz_n), BLOCK_K=blocks.k,
        V_ROWS=c.dw.v_rows, num_warps=blocks.warps, num_stages=blocks.stages, **c.consts,
    )  # fmt: skip


class ParamGrads(NamedTuple):
    """What the dW kernel writes (None where the parameter is absent)."""

    weight: Tensor
    bias: Tensor | None
    g1: Tensor | None
    b1: Tensor | None
    g2: Tensor | None
    b2: Tensor | None
    g3: Tensor | None
    b3: Tensor | None
    pos: Tensor | None  # None also where the table's gradient is made by segment sums
    prefix: Tensor | None  # the prefix rows' gradient (eager math, see the module docstring)


def _like(p: Tensor | None) -> Tensor | None:
    return None if p is None else torch.empty_like(p)


def launch_dw(kernel, c: BwdCall) -> ParamGrads:
    """Every parameter gradient: the column programs, the table programs where the table's
    rows are the grid positions, the dW GEMM and its finishing sums."""
    a, pol, plan, blocks = c.a, c.pol, c.dw, c.blocks
    x, weight, dim, patch_dim = a.x, a.weight, a.weight.shape[0], c.geo.patch_dim
    chans, patch = c.geo.chans, c.geo.patch
    acc = c.args.stats.dtype
    post, stem = a.post_norm != NO_NORM, a.stem_norm != NO_NORM
    grads = ParamGrads(
        torch.empty_like(weight, memory_format=torch.contiguous_format), _like(a.bias),
        _like(a.g1), _like(a.b1), _like(a.g2) if post else None, _like(a.b2) if post else None,
        _like(a.g3) if stem else None, _like(a.b3) if stem else None,
        _like(a.pos) if a.pos is not None and a.keep is None and a.pos_index is None else None,
        None,
    )  # fmt: skip
    prefix3 = (None, None)
    if a.prefix is not None:
        n_prefix = a.prefix.shape[0]
        dprefix, *prefix3 = prefix_grads(a, c.args.grad_y[:, :n_prefix], acc)
        grads = grads._replace(prefix=dprefix.to(a.prefix.dtype))
    d_side = (grads.bias, grads.g2, grads.b2, grads.g3, grads.b3)
    columns = cdiv(dim, pol.colsum_c) if any(g is not None for g in d_side) else 0
    tables = cdiv(c.rows, pol.table_n) * cdiv(dim, pol.table_d) if grads.pos is not None else 0
    gpart = x.new_empty((plan.splits, dim, patch_dim), dtype=acc)
    split_sums = dg1_parts = None
    if a.b1 is not None:  # dbias enters dW and db1: each token split's slice of it
        split_sums = x.new_empty((plan.k_tiles, plan.splits, dim), dtype=acc)
    if a.g1 is not None or a.b1 is not None:
        dg1_parts = x.new_empty((2, plan.d_tiles, patch_dim), dtype=acc)
    # The dW GEMM never reads the weight: the image alone picks its K order (G is kept in it).
    g_first = layout.rows_inner(x)
    w_strides = layout.element_strides(weight, chans, patch)
    dw_strides = layout.element_strides(grads.weight, chans, patch)
    flat = all(layout.flat_in(t, chans, patch, g_first) for t in (w_strides, dw_strides))
    dz_strides = c.dz.stride()
    dt_strides = (0, 0, 0) if c.dt is None else c.dt.stride()
    run = layout.gather_run(x, patch, g_first)
    gemm = plan.d_tiles * plan.k_tiles * plan.splits
    tiles = None  # the centred fold's lists of tiles, one row per GEMM program
    if c.centred:
        tiles = x.new_empty((gemm, cdiv(cdiv(c.tokens, blocks.dw_m), plan.splits)),
                            dtype=torch.int32)  # fmt: skip
    bound.launch(kernel, (columns + tables + gemm,),
        x, c.x_strides, c.args.stats, c.x_row_offsets, c.dz, dz_strides, c.dz_row_offsets,
        c.centring, c.unfit, tiles, c.partials, c.partials.shape[1], gpart, split_sums, dg1_parts,
        c.counters, weight, weight.stride(0), w_strides, (a.g1, a.b1),
        layout.linear_strides(1, chans, patch), grads.weight, grads.weight.stride(0),
        dw_strides, (grads.g1, grads.b1), grads.bias, (grads.g2, grads.b2),
        (grads.g3, grads.b3), tuple(prefix3), c.dt, dt_strides, grads.pos, c.tokens, patch_dim,
        dim, c.geo.batch, c.rows, plan.splits, columns, tables,
        FOLD=c.fold, CENTRED=c.centred, EVEN_K=patch_dim % blocks.dw_k == 0,
        X_RUN=run,
        ROW_ALIGN=layout.row_align(x, patch),
        DZ_ALIGN=1 if c.dz_row_offsets is None else layout.stride_align(*dz_strides[:2], dim),
        CHANNELS_FIRST=g_first, W_FLAT=flat, BLOCK_M=blocks.dw_m, BLOCK_D=plan.block_d,
        BLOCK_K=blocks.dw_k, CHUNK=plan.chunk, V_ROWS=plan.v_rows,
        FIN_D=min(blocks.param_d, plan.block_d), SUM_ROWS=pol.sum_rows, BLOCK_C=pol.colsum_c,
        BLOCK_B=pol.table_b, TABLE_N=pol.table_n, TABLE_D=pol.table_d, num_warps=blocks.warps,
        num_stages=blocks.stages, **c.consts, **_register_cap(c, run),
    )  # fmt: skip
    return grads


# Runs of the image's patch elements (layout.gather_run) below which the folded dW kernel is not
# capped: the gather's pointers of narrow runs (patch 14: pairs) take the registers the cap
# would leave, and it would spill a few hundred bytes (sm_90 compiles).
CAP_MIN_RUN = 8


def _register_cap(c: BwdCall, run: int) -> dict:
    """The folded dW kernel's register cap as a launch option, where it applies (a backend
    without the option, AMD's, rejects it even as None)."""
    cap = c.pol.dw_max_registers
    return {} if cap is None or not c.fold or run < CAP_MIN_RUN else {"maxnreg": cap}


def launch_dx(kernel, c: BwdCall, out: Tensor, out_strides: tuple[int, ...]) -> None:
    """The image gradient into ``out``: the image itself, or with a keep index per-token rows
    (``out`` (tokens, C, *patch)) that the caller sums into the patches."""
    a, k, blocks = c.a, c.k, c.blocks
    x = a.x
    dz_strides, dz_flat = layout.token_strides(c.dz)
    bound.launch(kernel, (cdiv(c.tokens, blocks.m),),
        x, x.stride(0), c.x_strides, k.weight, k.weight.stride(0), k.w_strides, k.w_row_len,
        k.g1, c.args.stats, c.dz, dz_strides, a.keep, out, out.stride(0), out_strides, c.tokens,
        c.geo.patch_dim, a.weight.shape[0], c.rows, c.geo.grid,
        DZ_FLAT=dz_flat, DX_ROWS=a.keep is not None, DZ_SCALED=c.dz_scaled, W_FLAT=k.w_flat,
        CHANNELS_FIRST=k.channels_first, BLOCK_M=blocks.m, BLOCK_D=blocks.dx_d,
        BLOCK_K=blocks.dx_k, num_warps=blocks.warps, num_stages=blocks.stages, **c.consts,
    )  # fmt: skip
