"""Launchers of the fused Triton kernels: shape checks, allocation, grids, and the small
reductions around the kernels (the second, fixed-order stage of the column and token-split
partial sums, the position table's batch sum, and the prefix rows' (P, D) problem, computed
by :mod:`.reference`'s eager math).

Layout decisions (strides, K order, alignment) come from :mod:`.layout`, tunables from
:mod:`.policy`, the integer-only decisions of a call (tiles, grids, the kernels' numerics)
from :mod:`.plan`. Imported lazily (it imports Triton), only when a fused call runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.contract import COLUMN_SUMS, LAYER_NORM, NO_NORM, STAT_ROWS
from ..kernels.fold import _fold_weight_kernel
from ..kernels.patch_embed_bwd import _bwd_dw_kernel, _bwd_dx_kernel, _bwd_param_kernel
from ..kernels.patch_embed_bwd_dz import _bwd_dz_kernel
from ..kernels.patch_embed_fwd import _finish_rows_kernel, _patch_embed_fwd_kernel
from ..kernels.segment_sum import _segment_sum_kernel
from . import bound, layout, policy, reference, tuning
from .args import BwdArgs, FwdArgs, Grads, fwd_of
from .plan import TL_DTYPES, block_width, cdiv, fwd_plan, numerics, plain_gemm
from .policy import LaunchPolicy
from .reference import prefix_grads, prefix_rows, stats_dtype

# Tokens are indexed in 32 bits (their divisions would otherwise be slow 64-bit calls), and
# the statistics buffer (rows, M) is addressed as row * M + m: that must fit in an int32.
MAX_TOKENS = 2**31 // len(STAT_ROWS)


def policy_of(a: FwdArgs, phase: str) -> LaunchPolicy:
    """The launch policy of a call (``phase``: tuning.bwd_phase or "fwd"): its device's, or
    the block sizes tuning chose for calls like it (a lookup: launchers never time)."""
    if tuning.tuning():
        return tuning.chosen_policy(a, phase)
    return policy.for_tensor(a.x)


def on_tensor_device(launcher):
    """Triton launches on the current CUDA device and its stream. A call whose tensors live on
    another GPU (``model.to("cuda:1")`` without ``torch.cuda.set_device``, as eager torch ops
    allow) switches to their device for its duration instead of faulting."""

    @functools.wraps(launcher)
    def on_device(args, *rest, **options):
        x = args.x
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(args, *rest, **options)
        return launcher(args, *rest, **options)

    return on_device


def _token_rows(a: FwdArgs, geo: layout.Geometry) -> tuple[int, int]:
    """(patch tokens per image, tokens in the call): every patch, or the kept ones."""
    if a.keep is None:
        return geo.per_image, geo.tokens
    return a.keep.shape[1], a.keep.numel()


@on_tensor_device
def patch_embed_fwd(a: FwdArgs, pol: LaunchPolicy | None = None,
                    with_stats: bool = True) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Run the fused forward; returns y (B, P + N, D) and the row statistics (None without
    ``with_stats``: no backward will read them). ``pol``: the launch policy (default: the
    device's, or the one tuning chose for this call)."""
    geo = layout.geometry(a.x, a.patch)
    dim = a.weight.shape[0]
    rows, tokens = _token_rows(a, geo)
    if tokens >= MAX_TOKENS:
        raise ValueError(
            f"{tokens} tokens (batch {geo.batch} x {rows} patches): the fused kernels take at "
            f"most {MAX_TOKENS - 1} per call; split the batch"
        )
    if geo.patch_dim == 0 or dim == 0:  # an empty projection: nothing for the kernels to do
        y, stats = reference.forward_with_stats(a)
        return y, stats if with_stats else None
    acc = stats_dtype(a.compute_dtype)
    stats = a.x.new_empty((len(STAT_ROWS), tokens), dtype=acc) if with_stats else None
    pol = pol or policy_of(a, "fwd")
    if pol.cublas_plain_gemm and plain_gemm(a, geo):
        # (the backward reads no statistics without norms: they stay unwritten)
        rows_2d = a.x.as_strided((tokens, geo.patch_dim), (a.x.stride(0), 1))
        y = F.linear(rows_2d, a.weight.reshape(dim, geo.patch_dim), a.bias)
        return y.view(tokens, 1, dim), stats
    n_prefix = 0 if a.prefix is None else a.prefix.shape[0]
    y = a.x.new_empty((geo.batch, n_prefix + rows, dim), dtype=a.out_dtype)
    if n_prefix:
        # The same P rows in every image: computed once (P x D), broadcast into place.
        y[:, :n_prefix] = prefix_rows(a, acc)
    if tokens == 0:
        return y, stats
    patch_tokens = y[:, n_prefix:] if n_prefix else y  # (a view costs host time on every call)
    _fwd_folded(a, pol, geo, patch_tokens, stats, rows, tokens, n_prefix == 0)
    return y, stats


def _fwd_folded(a: FwdArgs, pol: LaunchPolicy, geo: layout.Geometry, patch_tokens: Tensor,
                stats: Tensor | None, rows: int, tokens: int, y_flat: bool) -> None:  # fmt: skip
    """The folded forward: the weight folded per call (kernels/fold.py) where the pre-norm or
    the layout needs it, the main kernel, and the row-finishing kernel where programs share
    row blocks."""
    x, dim = a.x, a.weight.shape[0]
    blocks = pol.blocks(a.compute_dtype.itemsize)
    plan = fwd_plan(tokens, dim, blocks, pol.small_grid, pol.fwd_target_programs)
    proj = projection_operands(a, geo, pol)
    row_norm = a.post_norm != NO_NORM or a.stem_norm != NO_NORM
    shared = row_norm and plan.splits > 1
    consts = numerics(a.compute_dtype, pol)
    acc = stats_dtype(a.compute_dtype)
    row_parts = x.new_empty((2, plan.splits, tokens), dtype=acc) if shared else None
    # Raw patches go to the tensor cores unless a LayerNorm's mean would cancel in an inexact
    # operand (fp32 images, autocast; kernels/projection.py).
    exact = x.dtype == a.compute_dtype and x.dtype.itemsize == 2
    bound.launch(_patch_embed_fwd_kernel, (plan.row_blocks * plan.splits,),
        x, x.stride(0), x.stride()[1:], proj.weight, proj.weight.stride(0), proj.w_strides,
        proj.row_len, proj.colsum, proj.bias, (a.g2, a.b2), a.pos, a.keep, a.pos_index,
        (a.g3, a.b3), patch_tokens, patch_tokens.stride(), stats, row_parts, tokens,
        geo.patch_dim, dim, rows, geo.grid, plan.splits, plan.tiles_per_program, a.pre_eps,
        a.post_eps, a.stem_eps,
        C=geo.chans, PATCH=geo.patch, NORM1=a.pre_norm, NORM2=a.post_norm, NORM3=a.stem_norm,
        Y_FLAT=y_flat, SHIFT=a.pre_norm == LAYER_NORM and not exact, SHARED_ROWS=shared,
        EVEN_K=geo.patch_dim % blocks.fwd_k == 0, PAIR=plan.pair,
        X_RUN=layout.gather_run(x, geo.patch, proj.channels_first),
        W_FLAT=proj.flat, CHANNELS_FIRST=proj.channels_first, BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n, BLOCK_K=blocks.fwd_k, SWEEP_N=min(plan.block_n, blocks.sweep_n),
        num_warps=plan.warps,
        num_stages=blocks.fwd_stages, **consts,
    )  # fmt: skip
    if shared:
        bound.launch(_finish_rows_kernel, (cdiv(tokens, blocks.finish_m),),
            patch_tokens, patch_tokens.stride(), row_parts, stats, (a.g2, a.b2), a.pos, a.keep,
            a.pos_index, (a.g3, a.b3), tokens, dim, rows, plan.splits,
            plan.tiles_per_program * plan.block_n, a.post_eps, a.stem_eps,
            NORM2=a.post_norm, NORM3=a.stem_norm, Y_FLAT=y_flat, ACC_DTYPE=consts["ACC_DTYPE"],
            EMULATE_BF16=pol.emulate_bf16, BLOCK_M=blocks.finish_m,
            BLOCK_N=block_width(dim, blocks.sweep_n), num_warps=blocks.fwd_small_warps,
        )  # fmt: skip


class Projection(NamedTuple):
    """The weight operand of the folded forward, and the vectors of its epilogue."""

    weight: Tensor  # W' from kernels/fold.py, or the weight in place
    w_strides: tuple[int, ...]  # element strides (c, *patch) of its rows
    row_len: int  # readable length of its rows (zero-padded beyond K)
    flat: bool  # rows contiguous in the K order
    channels_first: bool  # the K order (geometry.patch_cols)
    colsum: Tensor | None  # row sums of W' (a LayerNorm pre-norm)
    bias: Tensor | None  # b' = W @ b1 + bias, or the bias


def projection_operands(a: FwdArgs, geo: layout.Geometry, pol: LaunchPolicy) -> Projection:
    """The folded weight W', its row sums and b' (kernels/fold.py), made for this call, when
    there is a pre-norm, when the weight is not in the GEMM operand dtype (autocast), or when
    it is not laid out in the K order the image is gathered in (layout.rows_inner) with
    16-element aligned rows (the latter only for calls of at least ``relayout_min_tokens``
    tokens); else the weight in place."""
    x, w, chans, patch = a.x, a.weight, geo.chans, geo.patch
    first = layout.rows_inner(x)
    w_strides = layout.element_strides(w, chans, patch)
    flat = layout.flat_in(w_strides, chans, patch, first)
    aligned = w.stride(0) % layout.W_ROW_ALIGN == 0 and geo.patch_dim % layout.W_ROW_ALIGN == 0
    small = geo.tokens < pol.relayout_min_tokens
    if a.pre_norm == NO_NORM and w.dtype == a.compute_dtype and flat and (aligned or small):
        return Projection(w, w_strides, w.stride(0) if aligned else geo.patch_dim, True, first,
                          None, a.bias)  # fmt: skip
    dim, acc = w.shape[0], stats_dtype(a.compute_dtype)
    row_len = layout.aligned_row_len(geo.patch_dim)
    folded = x.new_empty((dim, row_len), dtype=a.compute_dtype)
    colsum = x.new_empty((dim,), dtype=acc) if a.pre_norm == LAYER_NORM else None
    bias = x.new_empty((dim,), dtype=acc) if a.b1 is not None else a.bias
    bound.launch(_fold_weight_kernel, (cdiv(dim, pol.fold_d),),
        w, w.stride(0), w_strides, (a.g1, a.b1), layout.linear_strides(1, chans, patch), a.bias,
        folded, row_len, colsum, None if bias is a.bias else bias, geo.patch_dim, dim,
        C=chans, PATCH=patch, W_FLAT=layout.flat_in(w_strides, chans, patch, first),
        CHANNELS_FIRST=first, COMPUTE_DTYPE=TL_DTYPES[a.compute_dtype], ACC_DTYPE=TL_DTYPES[acc],
        EMULATE_BF16=pol.emulate_bf16, BLOCK_D=pol.fold_d, BLOCK_K=pol.fold_k,
    )  # fmt: skip
    strides = layout.flat_strides(chans, patch, first)
    return Projection(folded, strides, row_len, True, first, colsum, bias)


@on_tensor_device
def patch_embed_bwd(args: BwdArgs, pol: LaunchPolicy | None = None) -> Grads:
    """Run the fused backward; returns every gradient, None for those nobody needs (the
    custom op returns empty tensors there). ``pol``: as for :func:`patch_embed_fwd`."""
    a, grad_y, stats = fwd_of(args), args.grad_y, args.stats
    if not (a.weight.shape[0] and a.x.shape[1]):  # D = 0 or C = 0: an empty GEMM, no kernel
        return reference.backward_from_stats(args)  # (its D-side gradients need not be empty)
    if any(s == 0 and n > 1 for s, n in zip(grad_y.stride(), grad_y.shape, strict=True)):
        # A broadcast gradient (stride 0: a `.sum()` loss on the tokens) is made dense. Triton
        # specialises the kernels on its strides (a stride of 1 becomes a constant), so read in
        # place it would compile another dZ variant than the dense gradients a layer after the
        # stem, or zeta_fused.warmup, passes: a compile on the first real call.
        grad_y = grad_y.contiguous()
    x, weight = a.x, a.weight
    geo = layout.geometry(x, a.patch)
    chans, patch, patch_dim, dim = geo.chans, geo.patch, geo.patch_dim, weight.shape[0]
    rows, tokens = _token_rows(a, geo)
    pol = pol or policy_of(a, tuning.bwd_phase(args.needs_x_grad))
    blocks = pol.blocks(a.compute_dtype.itemsize)
    consts = dict(C=chans, PATCH=patch, NORM1=a.pre_norm, **numerics(a.compute_dtype, pol))
    k = layout.k_order(x, weight, a.g1, a.b1, geo, pol)  # for the dZ and image-gradient kernels
    x_strides = layout.element_strides(x, chans, patch)
    w_operand = (k.weight, k.weight.stride(0), k.w_strides, k.w_row_len)
    post = a.post_norm != NO_NORM
    acc = stats.dtype

    n_prefix = 0 if a.prefix is None else a.prefix.shape[0]
    # The patch tokens' rows, read in place (without prefix rows: grad_y itself, no view op).
    grad_tokens = grad_y[:, n_prefix:] if n_prefix else grad_y
    stem = a.stem_norm != NO_NORM

    # 1. dZ (through the stem norm, the position table and the post-norm) and the column
    # partials of every vector gradient over D.
    dz_tiles = cdiv(tokens, blocks.dz_m)
    partials = _scratch(x, (len(COLUMN_SUMS), max(dz_tiles, 1), dim), acc, zero=tokens == 0)
    x_row_offsets = x.new_empty((tokens,), dtype=torch.int64)
    shape = grad_tokens.shape
    dz = x.new_empty(shape, dtype=a.compute_dtype) if post or stem else grad_tokens
    # dT, the position table's per-token gradient: dY without a stem norm, dZ without a
    # post-norm, else a buffer the dZ kernel writes (only when there is a table).
    dt_buffer = (
        x.new_empty(shape, dtype=a.compute_dtype) if post and stem and a.pos is not None else None
    )
    dt = grad_tokens if not stem else dz if not post else dt_buffer
    dy_strides, dy_flat = layout.token_strides(grad_tokens)
    # dZ is dY with rows not evenly spaced (after prefix rows): the dZ kernel stores their
    # offsets for the dW GEMM, which would otherwise divide by N on every step.
    dz_row_offsets = None
    if dz is grad_tokens and not dy_flat:
        dz_row_offsets = x.new_empty((tokens,), dtype=torch.int64)
    if tokens:
        bound.launch(_bwd_dz_kernel, (dz_tiles,),
            x, x.stride(0), x_strides, *w_operand, a.bias, (k.g1, k.b1), (a.g2, a.b2), a.pos,
            a.keep, a.pos_index, (a.g3, a.b3), stats, grad_tokens, dy_strides, dz, dt_buffer,
            partials,
            x_row_offsets, dz_row_offsets, tokens, patch_dim, dim, rows, geo.grid,
            NORM2=a.post_norm, NORM3=a.stem_norm, DY_FLAT=dy_flat, W_FLAT=k.w_flat,
            CHANNELS_FIRST=k.channels_first,
            BLOCK_M=blocks.dz_m, BLOCK_N=block_width(dim, blocks.dz_n), BLOCK_K=blocks.k,
            num_warps=blocks.warps, num_stages=blocks.stages, **consts,
        )  # fmt: skip
    # Second, deterministic stage of the column reductions (each sum is a fresh tensor).
    dzsum = partials[COLUMN_SUMS.index("dz")].sum(0)

    # 2. All parameter gradients from G = dZ^T x̂.
    dw_d = block_width(dim, blocks.dw_d)  # narrow D (seed: 64) wastes no tensor-core rows
    d_tiles, k_tiles = cdiv(dim, dw_d), cdiv(patch_dim, blocks.dw_k)
    max_splits = min(pol.dw_max_splits, pol.dw_partial_bytes // (dim * patch_dim * acc.itemsize))
    dw_steps = cdiv(tokens, blocks.dw_m)
    splits = max(1, min(pol.dw_target_programs // (d_tiles * k_tiles), dw_steps, max_splits))
    gpart = _scratch(x, (splits, dim, patch_dim), acc, zero=tokens == 0)
    # The dW GEMM never reads the weight: the image alone picks its K order (G is kept in it).
    g_first = layout.rows_inner(x)
    if tokens:
        bound.launch(_bwd_dw_kernel, (d_tiles, k_tiles, splits),
            x, x_strides, stats, x_row_offsets, dz, dz.stride(), dz_row_offsets, gpart, tokens,
            patch_dim, dim, CHANNELS_FIRST=g_first, ROW_ALIGN=layout.row_align(x, patch),
            DZ_ALIGN=1 if dz_row_offsets is None else layout.stride_align(*dz.stride()[:2]),
            BLOCK_M=blocks.dw_m, BLOCK_D=dw_d, BLOCK_K=blocks.dw_k, num_warps=blocks.warps,
            num_stages=blocks.stages, **consts,
        )  # fmt: skip
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    dg1, db1 = (None if p is None else torch.empty_like(p) for p in (a.g1, a.b1))
    # Second stage of the token splits: a fixed-order reduction at full bandwidth.
    gsum = gpart[0] if splits == 1 else gpart.sum(0)
    w_strides = layout.element_strides(weight, chans, patch)
    dw_strides = layout.element_strides(dw, chans, patch)
    flat = all(layout.flat_in(t, chans, patch, g_first) for t in (w_strides, dw_strides))
    p_strides = layout.linear_strides(1, chans, patch)  # the (K,) pre-norm parameters
    bound.launch(_bwd_param_kernel, (cdiv(patch_dim, blocks.param_k),),
        gsum, dzsum, weight, weight.stride(0), w_strides, (a.g1, a.b1), p_strides, dw,
        dw.stride(0), dw_strides, (dg1, db1), patch_dim, dim,
        C=chans, PATCH=patch, ACC_DTYPE=consts["ACC_DTYPE"], EMULATE_BF16=pol.emulate_bf16,
        W_FLAT=flat, CHANNELS_FIRST=g_first, BLOCK_D=blocks.param_d, BLOCK_K=blocks.param_k,
        num_warps=blocks.param_warps,
    )  # fmt: skip

    # 3. The image gradient, only when asked for.
    dx = None
    if args.needs_x_grad:
        if a.keep is None:  # straight into the image
            dx = out = x.new_empty(x.shape)
            out_strides = layout.element_strides(dx, chans, patch)
        else:
            # Per-token patch gradients (a keep index may repeat a patch), summed into the
            # patches below in a fixed order; patches not kept get zeros.
            out = x.new_empty((tokens, chans, *patch), dtype=acc)
            out_strides = out.stride()[1:]
        if tokens:
            dz_strides, dz_flat = layout.token_strides(dz)
            bound.launch(_bwd_dx_kernel, (cdiv(tokens, blocks.m),),
                x, x.stride(0), x_strides, *w_operand, k.g1, stats, dz, dz_strides, a.keep, out,
                out.stride(0), out_strides, tokens, patch_dim, dim, rows, geo.grid,
                DZ_FLAT=dz_flat, DX_ROWS=a.keep is not None, W_FLAT=k.w_flat,
                CHANNELS_FIRST=k.channels_first, BLOCK_M=blocks.m, BLOCK_D=blocks.dx_d,
                BLOCK_K=blocks.dx_k, num_warps=blocks.warps, num_stages=blocks.stages,
                **consts,
            )  # fmt: skip
        if a.keep is not None:
            image = torch.arange(geo.batch, device=x.device)[:, None] * geo.per_image
            by_patch = _segment_sums(out.view(tokens, patch_dim), (image + a.keep).flatten(),
                                     geo.tokens, x.dtype, pol)  # fmt: skip
            dx = _patches_to_image(by_patch, geo)

    def column_sum(row: str, param: Tensor | None, prefix_part: Tensor | None = None):
        if param is None:
            return None
        total = partials[COLUMN_SUMS.index(row)].sum(0)
        return (total if prefix_part is None else total + prefix_part).to(param.dtype)

    dprefix = dg3_prefix = db3_prefix = None
    if a.prefix is not None:
        dprefix, dg3_prefix, db3_prefix = prefix_grads(a, grad_y[:, :n_prefix], acc)
    grads = Grads(
        x=dx, weight=dw, bias=None if a.bias is None else dzsum.to(a.bias.dtype), g1=dg1, b1=db1,
        g2=column_sum("dg2", a.g2) if post else None,
        b2=column_sum("db2", a.b2) if post else None,
        pos=None if a.pos is None else _table_grad(dt, a, pol),
        prefix=None if dprefix is None else dprefix.to(a.prefix.dtype),
        g3=column_sum("dg3", a.g3, dg3_prefix) if stem else None,
        b3=column_sum("db3", a.b3, db3_prefix) if stem else None,
    )  # fmt: skip
    return grads


def _table_grad(dt: Tensor, a: FwdArgs, pol: LaunchPolicy) -> Tensor:
    """The position table's gradient: dT summed over the batch, by table row with a keep or a
    table index (a fixed-order sum, as every other)."""
    index = a.keep if a.pos_index is None else a.pos_index
    if index is None:
        return dt.sum(0, dtype=stats_dtype(a.compute_dtype)).to(a.pos.dtype)
    rows = dt.reshape(-1, dt.shape[-1])
    return _segment_sums(rows, index.flatten(), a.pos.shape[0], a.pos.dtype, pol)


def _segment_sums(rows: Tensor, ids: Tensor, segments: int, dtype: torch.dtype,
                  pol: LaunchPolicy) -> Tensor:  # fmt: skip
    """(segments, W) sums of ``rows`` (R, W) by their ids (R,) in [0, segments), in ``dtype``:
    each in a fixed order (a stable sort of the ids), accumulated in fp32 (fp64 for fp64)."""
    order = ids.argsort(stable=True)
    bounds = torch.searchsorted(ids[order], torch.arange(segments + 1, device=ids.device))
    out = rows.new_empty((segments, rows.shape[1]), dtype=dtype)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    block = block_width(rows.shape[1], 256)
    acc = TL_DTYPES[torch.float64 if dtype == torch.float64 else torch.float32]
    if segments:
        bound.launch(_segment_sum_kernel, (segments, cdiv(rows.shape[1], block)),
            rows, rows.stride(0), order, bounds, out, out.stride(0), rows.shape[1],
            ACC_DTYPE=acc, EMULATE_BF16=pol.emulate_bf16, BLOCK_W=block,
        )  # fmt: skip
    return out


def _patches_to_image(patches: Tensor, geo: layout.Geometry) -> Tensor:
    """(B * N, C * prod(patch)) patch rows in (c, *patch) order as the image (B, C, *spatial)."""
    rank = len(geo.patch)
    grid = patches.view(geo.batch, *geo.grid, geo.chans, *geo.patch)
    order = [0, rank + 1] + [i for d in range(rank) for i in (1 + d, rank + 2 + d)]
    spatial = [g * p for g, p in zip(geo.grid, geo.patch, strict=True)]
    return grid.permute(order).reshape(geo.batch, geo.chans, *spatial)


def _scratch(like: Tensor, shape: tuple, dtype: torch.dtype, zero: bool) -> Tensor:
    """Partial-sum buffer; the kernels write every element, so it needs zeros only when no
    kernel runs (an empty batch)."""
    return like.new_zeros(shape, dtype=dtype) if zero else like.new_empty(shape, dtype=dtype)
