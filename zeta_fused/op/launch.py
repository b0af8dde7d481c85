"""Launchers of the fused Triton kernels: shape checks, allocation, grids. The kernels live in
this module's namespace (tests and the perf probes find and swap them here); the backward's
launchers are in :mod:`.launch_bwd`, which takes them from here.

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

from ..kernels.contract import LAYER_NORM, NO_NORM, STAT_ROWS
from ..kernels.fold import _fold_weight_kernel
from ..kernels.patch_embed_bwd import _bwd_dw_kernel, _bwd_dx_kernel
from ..kernels.patch_embed_bwd_dz import _bwd_dz_kernel
from ..kernels.patch_embed_fwd import _finish_rows_kernel, _patch_embed_fwd_kernel
from ..kernels.segment_sum import _segment_sum_kernel
from . import bound, launch_bwd, layout, policy, reference, tuning
from .args import BwdArgs, FwdArgs, Grads, fwd_of
from .plan import TL_DTYPES, block_width, cdiv, fwd_plan, numerics, plain_gemm
from .policy import LaunchPolicy
from .reference import prefix_rows, stats_dtype

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
    """Run the fused backward (docs/design.md, "Backward"; launchers in :mod:`.launch_bwd`);
    returns every gradient, None for those nobody needs (the custom op returns empty tensors
    there). ``pol``: as for :func:`patch_embed_fwd`."""
    a, grad_y = fwd_of(args), args.grad_y
    geo = layout.geometry(a.x, a.patch)
    rows, tokens = _token_rows(a, geo)
    if not (a.weight.shape[0] and a.x.shape[1] and tokens):
        # An empty GEMM (D = 0 or C = 0) or batch: no kernel (the eager backward's D-side
        # gradients need not be empty).
        return reference.backward_from_stats(args)
    if any(s == 0 and n > 1 for s, n in zip(grad_y.stride(), grad_y.shape, strict=True)):
        # A broadcast gradient (stride 0: a `.sum()` loss on the tokens) is made dense. Triton
        # specialises the kernels on its strides (a stride of 1 becomes a constant), so read in
        # place it would compile another dZ variant than the dense gradients a layer after the
        # stem, or zeta_fused.warmup, passes: a compile on the first real call.
        args = args._replace(grad_y=grad_y.contiguous())
    pol = pol or policy_of(a, tuning.bwd_phase(args.needs_x_grad))
    call = launch_bwd.bwd_call(args, pol, rows, tokens)
    launch_bwd.launch_dz(_bwd_dz_kernel, call)
    grads = launch_bwd.launch_dw(_bwd_dw_kernel, call)
    pos = grads.pos
    if a.pos is not None and pos is None:  # table rows by keep or table index: segment sums
        index = a.keep if a.pos_index is None else a.pos_index
        pos = _segment_sums(call.dt.reshape(-1, call.dt.shape[-1]), index.flatten(),
                            a.pos.shape[0], a.pos.dtype, pol)  # fmt: skip
    return Grads(
        x=_image_grad(call, pol) if args.needs_x_grad else None, weight=grads.weight,
        bias=grads.bias, g1=grads.g1, b1=grads.b1, g2=grads.g2, b2=grads.b2, pos=pos,
        prefix=grads.prefix, g3=grads.g3, b3=grads.b3,
    )  # fmt: skip


def _image_grad(call: launch_bwd.BwdCall, pol: LaunchPolicy) -> Tensor:
    """The image gradient: straight into the image, or with a keep index (which may repeat a
    patch) per-token patch gradients summed into the patches in a fixed order (patches not
    kept get zeros)."""
    a, geo, tokens = call.a, call.geo, call.tokens
    x = a.x
    if a.keep is None:
        dx = x.new_empty(x.shape)
        launch_bwd.launch_dx(_bwd_dx_kernel, call, dx,
                             layout.element_strides(dx, geo.chans, geo.patch))  # fmt: skip
        return dx
    out = x.new_empty((tokens, geo.chans, *geo.patch), dtype=call.args.stats.dtype)
    launch_bwd.launch_dx(_bwd_dx_kernel, call, out, out.stride()[1:])
    image = torch.arange(geo.batch, device=x.device)[:, None] * geo.per_image
    by_patch = _segment_sums(out.view(tokens, geo.patch_dim), (image + a.keep).flatten(),
                             geo.tokens, x.dtype, pol)  # fmt: skip
    return _patches_to_image(by_patch, geo)


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
