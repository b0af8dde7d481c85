"""The forward's launchers (docs/design.md, "Forward main loop" and "Host path"): every integer
decision of a call, made once per call signature (:func:`fwd_call`), and one small launcher per
kernel. Each launcher takes the kernel it launches: :mod:`.launch` holds the kernels (tests and
the perf probes find and swap them there) and runs the call (``launch.patch_embed_fwd``).

A call's decisions depend on its tensors' sizes, strides and dtypes, which of the optional
inputs are present, the norm kinds, the policy and torch's fp32 matmul precision, never on
their addresses or values: :func:`signature` lists exactly those, so that a call looks its
decisions up instead of making them. The tensors of the call (its inputs and the buffers
allocated for it) are passed at launch; nothing of a call is kept.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..kernels.contract import LAYER_NORM, NO_NORM, STAT_ROWS
from ..kernels.patch_embed_fwd import PREFIX_ROWS
from . import bound, layout, workspace
from .args import FwdArgs
from .plan import (
    TL_DTYPES,
    FwdPlan,
    block_width,
    cdiv,
    fwd_plan,
    numerics,
    plain_gemm,
    tf32_allowed,
)
from .policy import LaunchPolicy
from .reference import stats_dtype

# Tokens are indexed in 32 bits (their divisions would otherwise be slow 64-bit calls), and
# the statistics buffer (rows, M) is addressed as row * M + m: that must fit in an int32.
MAX_TOKENS = 2**31 // len(STAT_ROWS)

# What a call runs.
EMPTY, GEMM, FUSED = "empty", "gemm", "fused"


class FoldLaunch(NamedTuple):
    """The fold kernel's part of a call (kernels/fold.py): W' (dim, row_len), its row sums
    and b'."""

    grid: tuple[int]
    row_len: int  # W''s row stride: K rounded up to 16-element rows
    colsum: bool  # a LayerNorm pre-norm: the row sums of W'
    new_bias: bool  # b' = W @ b1 + bias (a pre-norm bias); else the bias itself
    w_strides: tuple[int, ...]  # the weight's element strides (c, *patch)
    p_strides: tuple[int, ...]  # the pre-norm vectors' element strides
    consts: dict  # constexprs and launch options


class FwdCall(NamedTuple):
    """A forward call's decisions (integers, dtypes and flags only)."""

    kind: str  # EMPTY, GEMM or FUSED
    geo: layout.Geometry
    rows: int  # patch tokens per image
    tokens: int
    n_prefix: int
    y_shape: tuple[int, ...]
    y_strides: tuple[int, ...]  # of y, and of its patch tokens' rows
    x_strides: tuple[int, ...]  # the image's, but the batch's
    stats_shape: tuple[int, int] | None  # None: no statistics kept
    acc: torch.dtype
    plan: FwdPlan | None
    fold: FoldLaunch | None  # None: the weight as it is
    w_strides: tuple[int, ...]  # the main kernel's weight operand: element strides (c, *patch)
    w_row_len: int  # its readable row length
    shared: bool  # row blocks shared by programs (plan.splits > 1 with a norm over D)
    counters: int  # row counters the fold zeroes for the main kernel (0: none)
    main_grid: tuple[int]
    main_consts: dict
    finish_grid: tuple[int] | None  # the row-finishing kernel, where no fold zeroes counters
    finish_consts: dict | None
    # The call's scratch (W', its row sums, b', the row counters, the shared rows' partials),
    # each part None where the call has none.
    scratch: workspace.Layout


def signature(a: FwdArgs, pol: LaunchPolicy, with_stats: bool) -> tuple:
    """Everything a forward call's decisions depend on."""
    x, w, keep = a.x, a.weight, a.keep
    tf32 = a.compute_dtype is torch.float32 and tf32_allowed()
    return (x.shape, x.stride(), x.dtype, w.shape, w.stride(), w.dtype, a.bias is None,
            a.pre_norm, a.b1 is None, a.post_norm, a.stem_norm, a.pos is None,
            None if a.prefix is None else a.prefix.shape[0], None if keep is None else keep.shape,
            *a.patch, a.compute_dtype, a.out_dtype, pol, with_stats, tf32)  # fmt: skip


_calls: dict[tuple, FwdCall] = {}
MAX_SIGNATURES = 512  # a long-running process with ever-new shapes starts the table afresh


def fwd_call(a: FwdArgs, pol: LaunchPolicy, with_stats: bool) -> FwdCall:
    """The call's decisions: a lookup, made on the first call of its signature (raising for
    a call the kernels cannot take, every time)."""
    key = signature(a, pol, with_stats)
    call = _calls.get(key)
    if call is None:
        call = _decide(a, pol, with_stats)
        if len(_calls) >= MAX_SIGNATURES:
            _calls.clear()
        _calls[key] = call
    return call


def _decide(a: FwdArgs, pol: LaunchPolicy, with_stats: bool) -> FwdCall:
    x, w = a.x, a.weight
    geo = layout.geometry(x, a.patch)
    dim = w.shape[0]
    if a.keep is None:
        rows, tokens = geo.per_image, geo.tokens
    else:
        rows, tokens = a.keep.shape[1], a.keep.numel()
    if tokens >= MAX_TOKENS:
        raise ValueError(
            f"{tokens} tokens (batch {geo.batch} x {rows} patches): the fused kernels take at "
            f"most {MAX_TOKENS - 1} per call; split the batch"
        )
    acc = stats_dtype(a.compute_dtype)
    n_prefix = 0 if a.prefix is None else a.prefix.shape[0]
    common = dict(geo=geo, rows=rows, tokens=tokens, n_prefix=n_prefix,
                  y_shape=(geo.batch, n_prefix + rows, dim),
                  y_strides=((n_prefix + rows) * dim, dim, 1), x_strides=x.stride()[1:],
                  stats_shape=(len(STAT_ROWS), tokens) if with_stats else None, acc=acc,
                  plan=None, fold=None, w_strides=(), w_row_len=0, shared=False, counters=0,
                  main_grid=(0,), main_consts={}, finish_grid=None, finish_consts=None,
                  scratch=workspace.layout(None, None, None, None, None))  # fmt: skip
    if geo.patch_dim == 0 or dim == 0:  # an empty projection: nothing for the kernels to do
        return FwdCall(EMPTY, **common)
    if pol.cublas_plain_gemm and plain_gemm(a, geo):
        return FwdCall(GEMM, **common)
    if tokens == 0:  # the prefix rows alone
        return FwdCall(FUSED, **common)
    blocks = pol.blocks(a.compute_dtype.itemsize)
    plan = fwd_plan(tokens, dim, blocks, pol.small_grid, pol.fwd_target_programs)
    shared = (a.post_norm != NO_NORM or a.stem_norm != NO_NORM) and plan.splits > 1
    chans, patch = geo.chans, geo.patch
    first = layout.rows_inner(x)
    w_strides = layout.element_strides(w, chans, patch)
    flat = layout.flat_in(w_strides, chans, patch, first)
    aligned = w.stride(0) % layout.W_ROW_ALIGN == 0 and geo.patch_dim % layout.W_ROW_ALIGN == 0
    small = geo.tokens < pol.relayout_min_tokens
    fold = None
    if a.pre_norm == NO_NORM and w.dtype == a.compute_dtype and flat and (aligned or small):
        row_len = w.stride(0) if aligned else geo.patch_dim
    else:  # W' made for the call: with a pre-norm, autocast, or a weight not laid out in K order
        row_len = layout.aligned_row_len(geo.patch_dim)
        fold = FoldLaunch(
            (cdiv(dim, pol.fold_d),), row_len, a.pre_norm == LAYER_NORM, a.b1 is not None,
            w_strides, layout.linear_strides(1, chans, patch),
            dict(C=chans, PATCH=patch, W_FLAT=flat, CHANNELS_FIRST=first,
                 COMPUTE_DTYPE=TL_DTYPES[a.compute_dtype], ACC_DTYPE=TL_DTYPES[acc],
                 EMULATE_BF16=pol.emulate_bf16, BLOCK_D=pol.fold_d, BLOCK_K=pol.fold_k),
        )  # fmt: skip
        w_strides, flat = layout.flat_strides(chans, patch, first), True
    consts = numerics(a.compute_dtype, pol)
    # Raw patches go to the tensor cores unless a LayerNorm's mean would cancel in an inexact
    # operand (fp32 images, autocast; kernels/projection.py).
    exact = x.dtype == a.compute_dtype and x.dtype.itemsize == 2
    main_consts = dict(
        C=chans, PATCH=patch, NORM1=a.pre_norm, NORM2=a.post_norm, NORM3=a.stem_norm,
        Y_FLAT=n_prefix == 0, SHIFT=a.pre_norm == LAYER_NORM and not exact, SHARED_ROWS=shared,
        EVEN_K=geo.patch_dim % blocks.fwd_k == 0, PAIR=plan.pair,
        X_RUN=layout.gather_run(x, patch, first), W_FLAT=flat, CHANNELS_FIRST=first,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=blocks.fwd_k,
        SWEEP_N=min(plan.block_n, blocks.sweep_n), num_warps=plan.warps,
        num_stages=blocks.fwd_stages, **consts,
    )  # fmt: skip
    finish_grid = finish_consts = None
    if shared and fold is None:  # no earlier kernel to zero row counters: a finishing kernel
        finish_grid = (cdiv(tokens, blocks.finish_m),)
        finish_consts = dict(
            NORM2=a.post_norm, NORM3=a.stem_norm, Y_FLAT=n_prefix == 0,
            ACC_DTYPE=consts["ACC_DTYPE"], EMULATE_BF16=pol.emulate_bf16,
            BLOCK_M=blocks.finish_m, BLOCK_N=block_width(dim, blocks.sweep_n),
            num_warps=blocks.fwd_small_warps,
        )  # fmt: skip
    counters = plan.row_blocks if shared and fold is not None else 0
    scratch = workspace.layout(
        None if fold is None else ((dim, row_len), a.compute_dtype),
        ((dim,), acc) if fold is not None and fold.colsum else None,
        ((dim,), acc) if fold is not None and fold.new_bias else None,
        ((counters,), torch.int32) if counters else None,
        ((2, plan.splits, tokens), acc) if shared else None,
    )  # fmt: skip
    common.update(plan=plan, fold=fold, w_strides=w_strides, w_row_len=row_len, shared=shared,
                  counters=counters, scratch=scratch,
                  main_grid=(plan.row_blocks * plan.splits + cdiv(n_prefix, PREFIX_ROWS.value),),
                  main_consts=main_consts,
                  finish_grid=finish_grid, finish_consts=finish_consts)  # fmt: skip
    return FwdCall(FUSED, **common)


class Projection(NamedTuple):
    """The weight operand of the main kernel, and the vectors of its epilogue."""

    weight: Tensor | workspace.Slot  # W' from kernels/fold.py, or the weight in place
    colsum: Tensor | workspace.Slot | None  # row sums of W' (a LayerNorm pre-norm)
    bias: Tensor | workspace.Slot | None  # b' = W @ b1 + bias, or the bias


def launch_fold(kernel, c: FwdCall, a: FwdArgs, folded, colsum, new_bias,
                row_counters) -> Projection:  # fmt: skip
    """W' into ``folded``, its row sums into ``colsum`` and b' into ``new_bias`` (parts of the
    call's scratch, None where the call has none); the fold also zeroes ``row_counters``, the
    main kernel's."""
    f, w = c.fold, a.weight
    bound.launch_fixed(kernel, f.grid, f.consts,
        w, w.stride(0), f.w_strides, (a.g1, a.b1), f.p_strides, a.bias, folded, f.row_len,
        colsum, new_bias, row_counters, c.counters, c.geo.patch_dim, w.shape[0],
    )  # fmt: skip
    return Projection(folded, colsum, a.bias if new_bias is None else new_bias)


def launch_main(kernel, c: FwdCall, a: FwdArgs, proj: Projection, patch_tokens: Tensor,
                stats: Tensor | None, row_parts, row_counters) -> None:  # fmt: skip
    """The main kernel (kernels/patch_embed_fwd.py): the tokens into ``patch_tokens``, the
    prefix rows before them."""
    x, plan = a.x, c.plan
    w_stride = a.weight.stride(0) if c.fold is None else c.fold.row_len
    bound.launch_fixed(kernel, c.main_grid, c.main_consts,
        x, x.stride(0), c.x_strides, proj.weight, w_stride, c.w_strides,
        c.w_row_len, proj.colsum, proj.bias, (a.g2, a.b2), a.pos, a.keep, a.pos_index,
        (a.g3, a.b3), a.prefix if c.n_prefix else None, c.n_prefix, patch_tokens,
        c.y_strides, stats, row_parts, row_counters, c.tokens, c.geo.patch_dim,
        a.weight.shape[0], c.rows, c.geo.grid, plan.splits, plan.tiles_per_program, a.pre_eps,
        a.post_eps, a.stem_eps,
    )  # fmt: skip


def launch_finish(kernel, c: FwdCall, a: FwdArgs, patch_tokens: Tensor, stats: Tensor | None,
                  row_parts) -> None:  # fmt: skip
    """The row-finishing kernel: rows shared by programs, in a call without a fold."""
    plan = c.plan
    bound.launch_fixed(kernel, c.finish_grid, c.finish_consts,
        patch_tokens, c.y_strides, row_parts, stats, (a.g2, a.b2), a.pos, a.keep,
        a.pos_index, (a.g3, a.b3), c.tokens, a.weight.shape[0], c.rows, plan.splits,
        plan.tiles_per_program * plan.block_n, a.post_eps, a.stem_eps,
    )  # fmt: skip
