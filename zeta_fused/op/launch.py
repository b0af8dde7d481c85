"""The fused calls: allocation and the order of launches. The kernels live in this module's
namespace (tests and the perf probes find and swap them here); the forward's decisions and
launchers are in :mod:`.launch_fwd`, the backward's in :mod:`.launch_bwd`, which take the
kernels from here.

Layout decisions (strides, K order, alignment) come from :mod:`.layout`, tunables from
:mod:`.policy`, the integer-only decisions of a call (tiles, grids, the kernels' numerics)
from :mod:`.plan`. Imported lazily (it imports Triton), only when a fused call runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.fold import _fold_weight_kernel
from ..kernels.patch_embed_bwd import _bwd_dw_kernel, _bwd_dx_kernel
from ..kernels.patch_embed_bwd_dz import _bwd_dz_kernel
from ..kernels.patch_embed_fwd import _finish_rows_kernel, _patch_embed_fwd_kernel
from ..kernels.segment_sum import _segment_sum_kernel
from . import bound, launch_bwd, launch_fwd, layout, policy, reference, tuning, workspace
from .args import BwdArgs, FwdArgs, Grads, fwd_of
from .plan import TL_DTYPES, block_width, cdiv
from .policy import LaunchPolicy
from .reference import prefix_rows


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
    device's, or the one tuning chose for this call). The weight is folded for the call
    (kernels/fold.py) where the pre-norm or the layout needs it; where programs share row
    blocks, the last of each block finishes its rows (the fold zeroes their counters), or with
    no fold the row-finishing kernel does."""
    c = launch_fwd.fwd_call(a, pol or policy_of(a, "fwd"), with_stats)
    x = a.x
    if c.kind == launch_fwd.EMPTY:
        y, stats = reference.forward_with_stats(a)
        return y, stats if with_stats else None
    stats = None if c.stats_shape is None else x.new_empty(c.stats_shape, dtype=c.acc)
    if c.kind == launch_fwd.GEMM:  # nothing to fuse: the GEMM itself (cuBLAS on a GPU)
        # (the backward reads no statistics without norms: they stay unwritten)
        dim, k = a.weight.shape[0], c.geo.patch_dim
        rows_2d = x.as_strided((c.tokens, k), (x.stride(0), 1))
        return F.linear(rows_2d, a.weight.reshape(dim, k), a.bias).view(c.tokens, 1, dim), stats
    y = x.new_empty(c.y_shape, dtype=a.out_dtype)
    if c.tokens == 0:
        if c.n_prefix:  # the prefix rows alone, the same P rows in every image
            y[:, : c.n_prefix] = prefix_rows(a, c.acc)
        return y, stats
    patch_tokens = y[:, c.n_prefix :] if c.n_prefix else y  # (a view costs host time)
    # (the workspace's memory, held by this frame until the launches are queued)
    _workspace, (folded, colsum, new_bias, row_counters, row_parts) = workspace.carve(x, c.scratch)
    if c.fold is None:
        proj = launch_fwd.Projection(a.weight, None, a.bias)
    else:
        proj = launch_fwd.launch_fold(_fold_weight_kernel, c, a, folded, colsum, new_bias,
                                      row_counters)  # fmt: skip
    launch_fwd.launch_main(_patch_embed_fwd_kernel, c, a, proj, patch_tokens, stats, row_parts,
                           row_counters)  # fmt: skip
    if c.finish_grid is not None:
        launch_fwd.launch_finish(_finish_rows_kernel, c, a, patch_tokens, stats, row_parts)
    return y, stats


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
    if 0 in grad_y.stride() and any(
        s == 0 and n > 1 for s, n in zip(grad_y.stride(), grad_y.shape, strict=True)
    ):
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
    # (tuple.__new__: Grads' own keyword __new__ is Python, on the per-call path)
    return tuple.__new__(Grads, (
        _image_grad(call, pol) if args.needs_x_grad else None, grads.weight, grads.bias,
        grads.g1, grads.b1, grads.g2, grads.b2, pos, grads.prefix, grads.g3, grads.b3,
    ))  # fmt: skip


def _image_grad(call: launch_bwd.BwdCall, pol: LaunchPolicy) -> Tensor:
    """The image gradient: straight into the image, or with a keep index (which may repeat a
    patch) per-token patch gradients summed into the patches in a fixed order (patches not
    kept get zeros)."""
    a, geo, tokens = call.a, call.d.geo, call.d.tokens
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
