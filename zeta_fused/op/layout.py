"""Patch geometry and operand layouts on the host, for any number of spatial dimensions
(docs/design.md, "Patch geometry"): what the launchers tell the kernels about strides, K order
and alignment. No allocation of outputs and no launches here.

An operand indexed by patch elements (the image, a conv weight, the image gradient) is
described by its element strides ``(c, *spatial)``; a Linear weight (D, K) with K in
(*patch, c) order is described by the same strides, derived from its K stride.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

from torch import Tensor

from .policy import LaunchPolicy

# Row alignment (elements) of a re-laid weight: 16 elements hold a 16-byte vector in any dtype,
# and Triton hints divisibility by 16.
W_ROW_ALIGN = 16
# Alignment hint (elements) of token offsets: 16 covers a 16-byte vector of any dtype.
MAX_ROW_ALIGN = 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Geometry(NamedTuple):
    batch: int
    chans: int
    grid: tuple[int, ...]  # patches along each spatial dimension
    patch: tuple[int, ...]
    per_image: int  # tokens per image: prod(grid)
    tokens: int  # batch * per_image
    patch_dim: int  # K = chans * prod(patch)


def geometry(x: Tensor, patch) -> Geometry:
    return _geometry(x.shape, tuple(patch))


@functools.lru_cache(maxsize=256)  # the launchers' per-call path: a lookup, not a computation
def _geometry(shape: tuple[int, ...], patch: tuple[int, ...]) -> Geometry:
    if len(patch) != len(shape) - 2:
        raise ValueError(f"a patch of {len(patch)} dims for an input of shape {tuple(shape)}")
    grid = tuple(s // p for s, p in zip(shape[2:], patch, strict=True))
    per_image = math.prod(grid)
    return Geometry(shape[0], shape[1], grid, patch, per_image, shape[0] * per_image,
                    shape[1] * math.prod(patch))  # fmt: skip


def element_strides(t: Tensor, chans: int, patch: tuple[int, ...]) -> tuple[int, ...]:
    """Strides (c, *patch) of the patch elements of an image, conv weight or gradient (the
    dims after the first), or of a Linear weight's (D, K) row with K in (*patch, c) order."""
    if t.ndim > 2:
        return t.stride()[1:]
    return linear_strides(t.stride(-1), chans, patch)


@functools.cache
def linear_strides(sk: int, chans: int, patch: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides (c, *patch) of a row of K elements in (*patch, c) order, stride sk."""
    return sk, *(sk * chans * math.prod(patch[d + 1 :]) for d in range(len(patch)))


@functools.cache
def flat_in(strides: tuple[int, ...], chans: int, patch: tuple[int, ...],
            channels_first: bool) -> bool:  # fmt: skip
    """Whether element strides (c, *patch) hold the patch axis contiguously in the kernels' K
    order, (c, *patch) if ``channels_first`` else (*patch, c): then it is read as one run. A
    stride along a dimension of size 1 never matters."""
    sizes = (chans, *patch)
    order = range(len(sizes)) if channels_first else (*range(1, len(sizes)), 0)
    run = 1
    for d in reversed(order):
        if sizes[d] != 1 and strides[d] != run:
            return False
        run *= sizes[d]
    return True


def aligned_row_len(k: int) -> int:
    """The row stride of a re-laid weight: K rounded up to W_ROW_ALIGN elements."""
    return _cdiv(k, W_ROW_ALIGN) * W_ROW_ALIGN


@functools.cache
def flat_strides(chans: int, patch: tuple[int, ...], channels_first: bool) -> tuple[int, ...]:
    """Element strides (c, *patch) of a row holding the patch contiguously in the K order."""
    if not channels_first:
        return linear_strides(1, chans, patch)
    return math.prod(patch), *(math.prod(patch[d + 1 :]) for d in range(len(patch)))


def gather_run(x: Tensor, patch: tuple[int, ...], channels_first: bool) -> int:
    """The contiguous runs an image's patch elements come in, in the K order: the largest power
    of two (at most MAX_ROW_ALIGN) dividing the run length (the innermost patch width; with
    channels last, times the channels) that every run's start keeps aligned; 1 where the
    innermost elements are not contiguous. The compiler sees runs of a power of two on its
    own; patch 14 (runs of 2) and channels-last images (runs of 3 x patch) it does not."""
    spatial = x.stride()[2:]
    starts = [x.stride(0), *spatial[:-1], *(p * s for p, s in zip(patch, spatial, strict=True))]
    if channels_first or x.shape[1] == 1:  # (one channel: the two orders are one)
        if spatial and spatial[-1] != 1:
            return 1
        return stride_align(patch[-1], x.stride(1), *starts)
    if x.stride(1) != 1 or (spatial and spatial[-1] != x.shape[1]):
        return 1
    return stride_align(patch[-1] * x.shape[1], *starts)


def rows_inner(x: Tensor) -> bool:
    """Pixel rows contiguous and more than one channel: the channels-first K order pays (the
    order the forward gathers such an image in; a channels-last one in (*patch, c))."""
    return x.shape[1] > 1 and x.stride(-1) == 1


class KOrder(NamedTuple):
    """How the kernels that read the weight walk the patch, and the operands to give them."""

    channels_first: bool  # (c, *patch) order, pixel rows innermost, else (*patch, c)
    weight: Tensor  # the weight, or a copy re-laid in the kernels' order
    w_strides: tuple[int, ...]  # its element strides (c, *patch)
    w_flat: bool
    w_row_len: int  # readable length of the weight's rows: K, or the zero-padded rows of a copy
    g1: Tensor | None  # pre-norm parameters in the K order (copies when channels-first)
    b1: Tensor | None


def k_order(x: Tensor, weight: Tensor, g1: Tensor | None, b1: Tensor | None, geo: Geometry,
            pol: LaunchPolicy) -> KOrder:  # fmt: skip
    """The K order of the kernels that read the weight, and their operands in it (see
    :func:`k_plan`)."""
    plan = k_plan(geo, x.stride(), weight.shape, weight.stride(), g1 is None and b1 is None, pol)
    return k_order_of(plan, weight, g1, b1, geo)


def k_order_of(plan: tuple, weight: Tensor, g1: Tensor | None, b1: Tensor | None,
               geo: Geometry) -> KOrder:  # fmt: skip
    """The operands in the K order :func:`k_plan` chose (``plan``); the copies are made here,
    per call."""
    first, relay, w_strides, flat, row_len = plan
    chans, patch = geo.chans, geo.patch
    if relay:
        weight = relaid(weight, chans, patch, first)
        w_strides, row_len = element_strides(weight, chans, patch), weight.stride(0)
    if first:
        g1, b1 = (_channels_first(p, chans, patch) for p in (g1, b1))
    # tuple.__new__: KOrder's own __new__ is a Python function, on the per-call path.
    return tuple.__new__(KOrder, (first, weight, w_strides, flat, row_len, g1, b1))


@functools.lru_cache(maxsize=256)  # integers only: the per-call path looks it up
def k_plan(geo: Geometry, x_strides: tuple[int, ...], w_shape: tuple[int, ...],
           w_strides_all: tuple[int, ...], no_params: bool,
           pol: LaunchPolicy) -> tuple[bool, bool, tuple[int, ...], bool, int]:  # fmt: skip
    """(channels_first, re-lay the weight, its element strides, flat, row length) for a call;
    a re-laid weight is flat, and k_order takes its strides and row length from the copy.

    The channels-first order gathers an NCHW image in runs of pixels along the last patch
    dimension (vector loads) instead of single elements (each of which can touch its own cache
    line); the runs vectorise when that patch width is a power of two. The order needs the
    weight and the pre-norm parameters in it too: a conv weight already is, and with no
    pre-norm parameters nothing is copied; otherwise the weight and parameters are re-laid (one
    small copy each) when the call is large enough for that to pay. Large calls also re-lay a
    weight whose rows are not 16-element aligned (K = 588 for patch 14), so that its tiles load
    as 16-byte asynchronous copies. (Instruction counts behind these choices: docs/design.md.)"""
    chans, patch, row_len = geo.chans, geo.patch, geo.patch_dim
    large = geo.tokens >= pol.relayout_min_tokens
    if len(w_shape) > 2:
        w_strides = w_strides_all[1:]
    else:
        w_strides = linear_strides(w_strides_all[-1], chans, patch)
    width = patch[-1]
    rows_inner = chans > 1 and x_strides[-1] == 1
    first = rows_inner and (pol.channels_first_any_width or width & (width - 1) == 0)
    first = first and (large or (no_params and flat_in(w_strides, chans, patch, True)))
    flat = flat_in(w_strides, chans, patch, first)
    aligned = w_strides_all[0] % W_ROW_ALIGN == 0 and row_len % W_ROW_ALIGN == 0
    relay = large and not (flat and aligned)
    return first, relay, w_strides, flat or relay, row_len


def _channels_first(param: Tensor | None, chans: int, patch: tuple[int, ...]) -> Tensor | None:
    """A (K,) parameter in (*patch, c) order, re-laid in (c, *patch) order."""
    if param is None:
        return None
    return param.reshape(*patch, chans).permute(len(patch), *range(len(patch))).reshape(-1)


def relaid(weight: Tensor, chans: int, patch: tuple[int, ...], channels_first: bool) -> Tensor:
    """A copy of a Linear (D, K) or conv weight holding each row contiguously in the K order,
    rows W_ROW_ALIGN-element aligned and zero-padded: a (D, C, *patch) or (D, K) view of the
    row-padded buffer."""
    d, k, nd = weight.shape[0], chans * math.prod(patch), len(patch)
    if weight.ndim == 2:
        patch_major = weight.reshape(d, *patch, chans)
    else:
        patch_major = weight.permute(0, *range(2, 2 + nd), 1)
    rows = weight.new_zeros((d, aligned_row_len(k)))[:, :k]
    if channels_first:
        out = rows.view(d, chans, *patch)
        out.copy_(patch_major.permute(0, nd + 1, *range(1, nd + 1)))
        return out
    rows.view(d, *patch, chans).copy_(patch_major)
    return rows


def row_align(x: Tensor, patch) -> int:
    """The largest power of two (at most MAX_ROW_ALIGN) dividing every token's first-pixel
    offset b * sb + sum over d of pos_d * patch_d * s_d."""
    spatial = x.stride()[2:]
    return stride_align(x.stride(0), *(p * s for p, s in zip(patch, spatial, strict=True)))


def stride_align(*strides: int) -> int:
    """The largest power of two (at most MAX_ROW_ALIGN) dividing every stride."""
    g = math.gcd(*strides) or MAX_ROW_ALIGN
    return min(g & -g, MAX_ROW_ALIGN)


def token_strides(t: Tensor) -> tuple[tuple[int, int, int], bool]:
    """Strides (b, n, d) of a (B, N, D) tensor, and whether its token rows are evenly spaced
    (then the kernels index them without dividing by N)."""
    sb, sn, sd = t.stride()
    return (sb, sn, sd), t.shape[0] <= 1 or sb == t.shape[1] * sn


class PatchPattern(NamedTuple):
    """An einops patchify pattern (vit-pytorch's ``Rearrange`` before the projection), read:
    ``b c (f pf) (h p1) (w p2) -> b (f h w) (pf p1 p2 c)`` and its kin of any rank."""

    patch: tuple[int, ...]  # patch sizes along the input's spatial dimensions
    order: tuple[int, ...]  # the spatial dimensions in the order of the output's patch axes
    groups: tuple[tuple[int, ...], ...]  # output dims between batch and features: spatial dims
    in_order: bool  # the patch axes in the input's order (the input need not be permuted)
    flat: bool  # tokens as (B, N, D) in grid order: the op's own output


def _groups(side: str) -> list[list[str]]:
    return [(g or n).split() for g, n in re.findall(r"\(([^()]*)\)|(\S+)", side)]


@functools.lru_cache(maxsize=64)
def parse_patchify(pattern: str, lengths: tuple[tuple[str, int], ...]) -> PatchPattern | str:
    """The patch layout of ``pattern`` with the axis ``lengths`` given, or why it is not one
    the kernels compute: (batch, channels, (grid patch) per spatial dimension) -> (batch, grid
    dimensions in order, however grouped, (patch axes in any order, channels last))."""
    sizes = dict(lengths)
    if pattern.count("->") != 1:
        return "not a rearrangement"
    lhs, rhs = (_groups(side) for side in pattern.split("->"))
    if len(lhs) < 3 or any(len(g) != 1 for g in lhs[:2]):
        return "the input is not (batch, channels, spatial dimensions...)"
    batch, chans = lhs[0][0], lhs[1][0]
    spatial = lhs[2:]
    if any(len(g) != 2 or g[1] not in sizes or g[0] in sizes for g in spatial):
        return "a spatial dimension is not (grid patch) with the patch length given"
    grid_names, patch_names = [g[0] for g in spatial], [g[1] for g in spatial]
    if len(rhs) < 2 or rhs[0] != [batch]:
        return "the output does not start with the batch"
    features, middle = rhs[-1], rhs[1:-1]
    if features[-1:] != [chans] or sorted(features[:-1]) != sorted(patch_names):
        return "the features are not (patch axes..., channels)"
    if [n for g in middle for n in g] != grid_names:
        return "the grid axes are not in the input's order"
    order = tuple(patch_names.index(n) for n in features[:-1])
    groups = tuple(tuple(grid_names.index(n) for n in g) for g in middle)
    in_order = order == tuple(range(len(order)))
    flat = in_order and len(groups) == 1
    return PatchPattern(tuple(sizes[n] for n in patch_names), order, groups, in_order, flat)
