"""The backward's launchers (docs/design.md, "Backward" and "Host path"): every integer decision
of a call, made once per call signature (:func:`bwd_decisions`), the buffers its kernels share,
and one small launcher per kernel. Each launcher takes the kernel it launches: :mod:`.launch`
holds the kernels (tests and the perf probes find and swap them there) and runs the call
(``launch.patch_embed_bwd``).

No torch op besides allocation runs here for a call without token subsets: the second stage of
every sum and the casts to the parameters' dtypes happen in the dW kernel, the prefix rows'
gradients in one more program of the dZ kernel. Token subsets (the segment sums of
:mod:`.launch`) add theirs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ..kernels.contract import COLUMN_SUMS, LAYER_NORM, NO_NORM
from . import bound, layout, workspace
from .args import BwdArgs, FwdArgs, fwd_of
from .plan import block_width, cdiv, next_power_of_2, numerics, tf32_allowed
from .policy import Blocks, LaunchPolicy


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


class BwdDecisions(NamedTuple):
    """A backward call's decisions (integers, dtypes and flags only)."""

    geo: layout.Geometry
    rows: int  # patch tokens per image
    tokens: int
    blocks: Blocks
    consts: dict  # constexprs of every GEMM kernel (numerics, channels, patch, pre-norm)
    k_plan: tuple  # layout.k_plan's: the K order of the kernels that read the weight
    x_strides: tuple[int, ...]
    fold: bool  # the dW GEMM takes both operands as stored (kernels/patch_embed_bwd_dw.py)
    dz_scaled: bool  # the dZ buffer holds Ẑ = dZ * rstd1
    centred: bool  # folded with a LayerNorm pre-norm (kernels/patch_embed_bwd_dw.py)
    dw: DwPlan
    dz_buffer: bool  # the dZ kernel writes dZ (else the GEMMs read dY)
    own_dt: bool  # dT has a buffer of its own
    dy_strides: tuple[int, int, int]  # (b, n, d) of the patch tokens' upstream gradient
    dz_strides: tuple[int, int, int]  # of the GEMMs' dZ operand (the dZ buffer, or dY)
    dz_flat: bool  # its token rows evenly spaced
    dt_strides: tuple[int, int, int]  # of dT
    rows_apart: bool  # the dZ and dT buffers are tensors of their own, not scratch parts
    dz_row_offsets: bool  # the dZ kernel stores each token's dZ row offset
    partials: tuple[int, int, int]  # shape of the dZ programs' column partials
    n_prefix: int  # prefix rows: their gradients by one more program of the dZ kernel
    counters: int  # the dW kernel's counters, zeroed by the dZ kernel
    dz_consts: dict
    table: bool  # the table's gradient by table programs (its rows are the grid positions)
    dw_grid: tuple[int]
    dw_counts: tuple[int, int]  # (column programs, table programs)
    w_strides: tuple[int, ...]  # element strides (c, *patch) of the weight
    dw_strides: tuple[int, ...]  # and of its gradient (allocated contiguous)
    p_strides: tuple[int, ...]  # element strides (c, *patch) of the pre-norm's vectors
    dw_consts: dict
    scratch: workspace.Layout  # the parts of BwdCall.scratch, in its order


class Scratch(NamedTuple):
    """A backward call's scratch, one workspace (:mod:`.workspace`); None where the call has
    none of a part."""

    dz: object  # (tokens + centred, D) the dZ kernel's buffer, or None (see BwdCall.dz)
    dt: object  # (tokens, D) dT's own buffer, or None
    partials: object  # (COLUMN_SUMS, dZ programs, D) the dZ programs' column partials
    x_row_offsets: object  # (tokens,) int64
    dz_row_offsets: object  # (tokens,) int64
    centring: object  # (groups, D) sums of Ẑ * mean1 (a centred fold)
    unfit: object  # (groups,) int32 flags of groups the fold would cancel on
    counters: object  # the dW kernel's int32 counters, zeroed by the dZ kernel
    prefix_dy: object  # (P, D) the prefix rows' upstream gradient summed over the images
    prefix_dg3: object  # (D,) their parts of the stem norm's dg3 and db3
    prefix_db3: object
    gpart: object  # (splits, D, K) G per token split
    split_sums: object  # (K tiles, splits, D) dbias per token split (a pre-norm bias)
    dg1_parts: object  # (2, D tiles, K) dg1 and db1 per weight tile
    tiles: object  # (GEMM programs, tiles per split) int32: the centred fold's tile lists


def signature(args: BwdArgs, pol: LaunchPolicy) -> tuple:
    """Everything a backward call's decisions depend on."""
    a, dy = fwd_of(args), args.grad_y
    x, w, keep = a.x, a.weight, a.keep
    tf32 = a.compute_dtype is torch.float32 and tf32_allowed()
    absent = (a.bias is None, a.g1 is None, a.b1 is None, a.g2 is None, a.b2 is None,
              a.pos is None, a.prefix is None, a.pos_index is None, a.g3 is None,
              a.b3 is None)  # fmt: skip
    return (dy.shape, dy.stride(), args.stats.dtype, x.shape, x.stride(), x.dtype, w.shape,
            w.stride(), w.dtype, absent, a.pre_norm, a.post_norm, a.stem_norm,
            None if a.prefix is None else a.prefix.shape[0],
            None if keep is None else keep.shape, *a.patch, a.compute_dtype, pol, tf32)  # fmt: skip


_decided: dict[tuple, BwdDecisions] = {}
MAX_SIGNATURES = 512  # a long-running process with ever-new shapes starts the table afresh


def bwd_decisions(args: BwdArgs, pol: LaunchPolicy, rows: int, tokens: int) -> BwdDecisions:
    """The call's decisions: a lookup, made on the first call of its signature."""
    key = signature(args, pol)
    d = _decided.get(key)
    if d is None:
        d = _decide(args, pol, rows, tokens)
        if len(_decided) >= MAX_SIGNATURES:
            _decided.clear()
        _decided[key] = d
    return d


def _decide(args: BwdArgs, pol: LaunchPolicy, rows: int, tokens: int) -> BwdDecisions:
    a = fwd_of(args)
    x, weight = a.x, a.weight
    geo = layout.geometry(x, a.patch)
    dim, chans, patch, patch_dim = weight.shape[0], geo.chans, geo.patch, geo.patch_dim
    blocks = pol.blocks(a.compute_dtype.itemsize)
    consts = dict(C=chans, PATCH=patch, NORM1=a.pre_norm, **numerics(a.compute_dtype, pol))
    n_prefix = 0 if a.prefix is None else a.prefix.shape[0]
    grad_tokens = args.grad_y[:, n_prefix:]
    post, stem = a.post_norm != NO_NORM, a.stem_norm != NO_NORM
    # The folded dW GEMM reads the image as stored: 16-bit images in the operand dtype. With a
    # pre-norm, dZ carries its rstd (Ẑ), in bf16 only: fp16 could overflow there.
    fold = pol.dw_fold and x.dtype == a.compute_dtype and x.dtype.itemsize == 2
    fold = fold and (a.pre_norm == NO_NORM or x.dtype == torch.bfloat16)
    dz_scaled = fold and a.pre_norm != NO_NORM
    acc = args.stats.dtype
    plan = dw_plan(tokens, dim, patch_dim, blocks, pol, acc.itemsize)
    centred = dz_scaled and a.pre_norm == LAYER_NORM
    dz_buffer = post or stem or dz_scaled
    # dT, the position table's per-token gradient: dY without a stem norm, the dZ buffer
    # without a post-norm (unless it holds Ẑ), else a buffer the dZ kernel writes.
    own_dt = a.pos is not None and stem and (post or dz_scaled)
    dy_strides, dy_flat = layout.token_strides(grad_tokens)
    # dZ is dY with rows not evenly spaced (after prefix rows): the dZ kernel stores their
    # offsets for the dW GEMM, which would otherwise divide by N on every step.
    dz_row_offsets = centred or (not dz_buffer and not dy_flat)
    own = (rows * dim, dim, 1)  # the strides of the call's own dZ and dT rows
    dz_strides, dz_flat = (own, True) if dz_buffer else (dy_strides, dy_flat)
    dt_strides = dy_strides if not stem else own if own_dt else dz_strides
    dz_tiles = cdiv(tokens, blocks.dz_m)
    k_plan = layout.k_plan(geo, x.stride(), weight.shape, weight.stride(),
                           a.g1 is None and a.b1 is None, pol)  # fmt: skip
    first, _relay, _w_strides, w_flat, _row_len = k_plan
    dz_consts = dict(
        NORM2=a.post_norm, NORM3=a.stem_norm, DY_FLAT=dy_flat, DZ_SCALED=dz_scaled,
        W_FLAT=w_flat, CHANNELS_FIRST=first, BLOCK_M=blocks.dz_m,
        BLOCK_N=block_width(dim, blocks.dz_n), BLOCK_K=blocks.k, V_ROWS=plan.v_rows,
        BLOCK_P=next_power_of_2(n_prefix), num_warps=blocks.warps, num_stages=blocks.stages,
        **consts,
    )  # fmt: skip
    # The dW kernel's programs: column sums, table sums, then the GEMM's tiles.
    d_side = (a.bias is not None or (post and (a.g2 is not None or a.b2 is not None))
              or (stem and (a.g3 is not None or a.b3 is not None)))  # fmt: skip
    table = a.pos is not None and a.keep is None and a.pos_index is None
    columns = cdiv(dim, pol.colsum_c) if d_side else 0
    tables = cdiv(rows, pol.table_n) * cdiv(dim, pol.table_d) if table else 0
    gemm = plan.d_tiles * plan.k_tiles * plan.splits
    # The dW GEMM never reads the weight: the image alone picks its K order (G is kept in it).
    g_first = layout.rows_inner(x)
    w_strides = layout.element_strides(weight, chans, patch)
    # (dW is allocated contiguous, in the weight's shape)
    dw_strides = (layout.linear_strides(1, chans, patch) if weight.ndim == 2
                  else layout.flat_strides(chans, patch, True))  # fmt: skip
    flat = all(layout.flat_in(t, chans, patch, g_first) for t in (w_strides, dw_strides))
    run = layout.gather_run(x, patch, g_first)
    dw_consts = dict(
        FOLD=fold, CENTRED=centred, EVEN_K=patch_dim % blocks.dw_k == 0, X_RUN=run,
        ROW_ALIGN=layout.row_align(x, patch),
        DZ_ALIGN=layout.stride_align(*dz_strides[:2], dim) if dz_row_offsets else 1,
        CHANNELS_FIRST=g_first, W_FLAT=flat, BLOCK_M=blocks.dw_m, BLOCK_D=plan.block_d,
        BLOCK_K=blocks.dw_k, CHUNK=plan.chunk, V_ROWS=plan.v_rows,
        FIN_D=min(blocks.param_d, plan.block_d), SUM_ROWS=pol.sum_rows, BLOCK_C=pol.colsum_c,
        BLOCK_B=pol.table_b, TABLE_N=pol.table_n, TABLE_D=pol.table_d, num_warps=blocks.warps,
        num_stages=blocks.stages, **consts, **_register_cap(pol, fold, run),
    )  # fmt: skip
    tile_lists = (gemm, cdiv(cdiv(tokens, blocks.dw_m), plan.splits)) if centred else None
    partials = (len(COLUMN_SUMS), min(dz_tiles, max(1, pol.dz_programs - (n_prefix > 0))), dim)
    groups = dz_tiles * (blocks.dz_m // plan.v_rows)
    counters = plan.d_tiles * plan.k_tiles + plan.k_tiles
    prefix_sums = n_prefix > 0 and stem
    # dZ and dT rows: in the scratch, unless segment sums of the table's rows read them as
    # tensors. (A centred fold reads the tokens it leaves out as a row of zeros after dZ's.)
    rows_apart = a.pos is not None and not table
    scratch = workspace.layout(
        ((tokens + centred, dim), a.compute_dtype) if dz_buffer and not rows_apart else None,
        ((tokens, dim), a.compute_dtype) if own_dt and not rows_apart else None,
        (partials, acc), ((tokens,), torch.int64),
        ((tokens,), torch.int64) if dz_row_offsets else None,
        ((groups, dim), acc) if centred else None,
        ((groups,), torch.int32) if centred else None,
        ((counters,), torch.int32),
        ((n_prefix, dim), acc) if prefix_sums else None,
        ((dim,), acc) if prefix_sums and a.g3 is not None else None,
        ((dim,), acc) if prefix_sums and a.b3 is not None else None,
        ((plan.splits, dim, patch_dim), acc),
        ((plan.k_tiles, plan.splits, dim), acc) if a.b1 is not None else None,
        ((2, plan.d_tiles, patch_dim), acc) if a.g1 is not None or a.b1 is not None else None,
        (tile_lists, torch.int32) if tile_lists is not None else None,
    )  # fmt: skip
    return BwdDecisions(
        geo, rows, tokens, blocks, consts, k_plan, layout.element_strides(x, chans, patch),
        fold, dz_scaled, centred, plan, dz_buffer, own_dt, dy_strides, dz_strides,
        dz_flat, dt_strides, rows_apart, dz_row_offsets,
        # (with prefix rows their program takes one of the persistent programs' places)
        partials, n_prefix, counters, dz_consts, table, (columns + tables + gemm,),
        (columns, tables), w_strides, dw_strides,
        layout.linear_strides(1, chans, patch), dw_consts, scratch,
    )  # fmt: skip


class BwdCall(NamedTuple):
    """A backward call: its decisions, operands and the buffers the dZ kernel writes for the
    others."""

    d: BwdDecisions
    args: BwdArgs
    a: FwdArgs
    pol: LaunchPolicy
    k: layout.KOrder  # the K order and operands of the kernels that read the weight
    grad_tokens: Tensor  # the patch tokens' rows of the upstream gradient
    # The dW and image-gradient GEMMs' operand: the dZ kernel's buffer, or dY
    dz: Tensor | workspace.Slot
    # dT for the position table's gradient: dY, the dZ buffer, or its own
    dt: Tensor | workspace.Slot
    dt_buffer: Tensor | workspace.Slot | None  # dT where the dZ kernel writes it
    dprefix: Tensor | None  # the prefix rows' gradient, made by the dZ kernel
    s: Scratch  # the buffers the kernels pass each other
    workspace: Tensor | None  # the memory of ``s``, held by the call


def bwd_call(args: BwdArgs, pol: LaunchPolicy, rows: int, tokens: int) -> BwdCall:
    """The call's decisions, its weight in the kernels' K order and the dZ kernel's buffers."""
    d = bwd_decisions(args, pol, rows, tokens)
    a, grad_y = fwd_of(args), args.grad_y
    x, dim = a.x, a.weight.shape[0]
    n_prefix = grad_y.shape[1] - rows
    grad_tokens = grad_y[:, n_prefix:] if n_prefix else grad_y  # (without prefix: no view op)
    ws, parts = workspace.carve(x, d.scratch)
    scratch = tuple.__new__(Scratch, parts)
    dz, dt_buffer = scratch.dz, scratch.dt
    if d.rows_apart:  # tensors for the segment sums
        shape = grad_tokens.shape
        if d.dz_buffer:
            dz = x.new_empty((tokens + d.centred, dim), dtype=a.compute_dtype)[:tokens].view(shape)
        if d.own_dt:
            dt_buffer = x.new_empty(shape, dtype=a.compute_dtype)
    if not d.dz_buffer:
        dz = grad_tokens
    dt = grad_tokens if a.stem_norm == NO_NORM else dt_buffer if d.own_dt else dz
    # ((0, D) for no prefix rows: an empty gradient, as eager gives)
    dprefix = None if a.prefix is None else x.new_empty((d.n_prefix, dim), dtype=a.prefix.dtype)
    return tuple.__new__(BwdCall, (
        d, args, a, pol, layout.k_order_of(d.k_plan, a.weight, a.g1, a.b1, d.geo), grad_tokens,
        dz, dt, dt_buffer, dprefix, scratch, ws,
    ))  # fmt: skip


def launch_dz(kernel, c: BwdCall) -> None:
    """dZ (or Ẑ) through the norms over D, the column partials and what the dW GEMM reads."""
    a, k, d, s = c.a, c.k, c.d, c.s
    x = a.x
    bound.launch_fixed(kernel, (d.partials[1] + (d.n_prefix > 0),), d.dz_consts,
        x, x.stride(0), d.x_strides, k.weight, k.weight.stride(0), k.w_strides, k.w_row_len,
        a.bias, (k.g1, k.b1), (a.g2, a.b2), a.pos, a.keep, a.pos_index, (a.g3, a.b3),
        a.prefix if d.n_prefix else None, d.n_prefix, a.stem_eps, c.dprefix, s.prefix_dy,
        (s.prefix_dg3, s.prefix_db3), c.args.stats, c.grad_tokens, d.dy_strides,
        c.dz, c.dt_buffer, s.partials, s.centring, s.unfit, s.x_row_offsets, s.dz_row_offsets,
        s.counters, d.counters,
        d.tokens, d.geo.patch_dim, a.weight.shape[0], d.rows, d.geo.grid,
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
    a, d, s = c.a, c.d, c.s
    x, weight, dim, patch_dim = a.x, a.weight, a.weight.shape[0], d.geo.patch_dim
    post, stem = a.post_norm != NO_NORM, a.stem_norm != NO_NORM
    grads = ParamGrads(
        torch.empty_like(weight, memory_format=torch.contiguous_format), _like(a.bias),
        _like(a.g1), _like(a.b1), _like(a.g2) if post else None, _like(a.b2) if post else None,
        _like(a.g3) if stem else None, _like(a.b3) if stem else None,
        _like(a.pos) if d.table else None, c.dprefix,
    )  # fmt: skip
    columns, tables = d.dw_counts
    bound.launch_fixed(kernel, d.dw_grid, d.dw_consts,
        x, d.x_strides, c.args.stats, s.x_row_offsets, c.dz, d.dz_strides, s.dz_row_offsets,
        s.centring, s.unfit, s.tiles, s.partials, d.partials[1], s.gpart, s.split_sums,
        s.dg1_parts, s.counters, weight, weight.stride(0), d.w_strides, (a.g1, a.b1),
        d.p_strides, grads.weight, grads.weight.stride(0), d.dw_strides,
        (grads.g1, grads.b1), grads.bias, (grads.g2, grads.b2), (grads.g3, grads.b3),
        (s.prefix_dg3, s.prefix_db3), c.dt, d.dt_strides,
        grads.pos, d.tokens, patch_dim, dim, d.geo.batch, d.rows, d.dw.splits, columns, tables,
    )  # fmt: skip
    return grads


# Runs of the image's patch elements (layout.gather_run) below which the folded dW kernel is not
# capped: the gather's pointers of narrow runs (patch 14: pairs) take the registers the cap
# would leave, and it would spill a few hundred bytes (sm_90 compiles).
CAP_MIN_RUN = 8


def _register_cap(pol: LaunchPolicy, fold: bool, run: int) -> dict:
    """The folded dW kernel's register cap as a launch option, where it applies (a backend
    without the option, AMD's, rejects it even as None)."""
    cap = pol.dw_max_registers
    return {} if cap is None or not fold or run < CAP_MIN_RUN else {"maxnreg": cap}


def launch_dx(kernel, c: BwdCall, out: Tensor, out_strides: tuple[int, ...]) -> None:
    """The image gradient into ``out``: the image itself, or with a keep index per-token rows
    (``out`` (tokens, C, *patch)) that the caller sums into the patches."""
    a, k, d = c.a, c.k, c.d
    x, blocks = a.x, d.blocks
    bound.launch(kernel, (cdiv(d.tokens, blocks.m),),
        x, x.stride(0), d.x_strides, k.weight, k.weight.stride(0), k.w_strides, k.w_row_len,
        k.g1, c.args.stats, c.dz, d.dz_strides, a.keep, out, out.stride(0), out_strides, d.tokens,
        d.geo.patch_dim, a.weight.shape[0], d.rows, d.geo.grid,
        DZ_FLAT=d.dz_flat, DX_ROWS=a.keep is not None, DZ_SCALED=d.dz_scaled, W_FLAT=k.w_flat,
        CHANNELS_FIRST=k.channels_first, BLOCK_M=blocks.m, BLOCK_D=blocks.dx_d,
        BLOCK_K=blocks.dx_k, num_warps=blocks.warps, num_stages=blocks.stages, **d.consts,
    )  # fmt: skip
