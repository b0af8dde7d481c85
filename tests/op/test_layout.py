"""The layout decisions that the compiled code trusts: element strides, contiguity flags, the K
order and alignment hints, in 1, 2 and 3 spatial dimensions.

A wrong "flat" flag reads the wrong elements, and a wrong alignment hint makes the GPU issue
misaligned vector loads; the interpreter ignores hints, so these are checked here directly.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from zeta_fused.op import layout, policy


def first_pixel_offsets(x: torch.Tensor, patch) -> torch.Tensor:
    """Every token's first-pixel offset, from the strides, tokens in grid order."""
    grid = [s // p for s, p in zip(x.shape[2:], patch, strict=True)]
    offs = [
        b * x.stride(0) + sum(i * p * s for i, p, s in zip(pos, patch, x.stride()[2:], strict=True))
        for b in range(x.shape[0])
        for pos in itertools.product(*map(range, grid))
    ]
    return torch.tensor(offs)


@pytest.mark.parametrize(
    "make, patch",
    [
        (lambda: torch.empty(2, 3, 224, 224), (16, 16)),
        (lambda: torch.empty(2, 3, 224, 224), (14, 14)),
        (lambda: torch.empty(2, 3, 32, 48).to(memory_format=torch.channels_last), (4, 4)),
        (lambda: torch.empty(2, 3, 30, 45)[..., 3:], (3, 7)),
        (lambda: torch.empty(1, 3, 16, 16).expand(4, 3, 16, 16), (8, 8)),
        (lambda: torch.empty(2, 5, 36), (6,)),
        (lambda: torch.empty(2, 4, 3, 8, 12).transpose(1, 2), (2, 4, 4)),  # (B, T, C, H, W)
    ],
    ids=["nchw-p16", "nchw-p14", "channels-last", "sliced", "expanded", "1d", "3d-btchw"],
)
def test_row_align_divides_every_token_offset(make, patch) -> None:
    x = make()
    align = layout.row_align(x, patch)
    assert align & (align - 1) == 0 and 1 <= align <= layout.MAX_ROW_ALIGN
    assert bool((first_pixel_offsets(x, patch) % align == 0).all())


def test_row_align_is_not_needlessly_small() -> None:
    assert layout.row_align(torch.empty(2, 3, 224, 224), (16, 16)) == 16


WEIGHTS = {  # (weight factory, chans, patch)
    "linear": (lambda: torch.empty(20, 24), 3, (4, 2)),
    "linear-t": (lambda: torch.empty(24, 20).t(), 3, (4, 2)),
    "conv": (lambda: torch.empty(20, 3, 4, 2), 3, (4, 2)),
    "conv-channels-last": (
        lambda: torch.empty(20, 3, 4, 2).to(memory_format=torch.channels_last),
        3,
        (4, 2),
    ),
    "linear-1d": (lambda: torch.empty(20, 12), 3, (4,)),
    "conv3d": (lambda: torch.empty(20, 3, 2, 4, 2), 3, (2, 4, 2)),
    "linear-3d": (lambda: torch.empty(20, 48), 3, (2, 4, 2)),
}


@pytest.mark.parametrize("channels_first", [False, True], ids=["patch-major", "channels-first"])
@pytest.mark.parametrize("name", WEIGHTS)
def test_flat_means_offset_equals_index(name, channels_first) -> None:
    """flat_in is True exactly when the element offsets of the patch axis, walked in the
    kernels' K order, are 0, 1, 2, ..."""
    make, chans, patch = WEIGHTS[name]
    strides = layout.element_strides(make(), chans, patch)
    index = torch.meshgrid(*(torch.arange(n) for n in (chans, *patch)), indexing="ij")
    offsets = sum(i * s for i, s in zip(index, strides, strict=True))  # (c, *patch) order
    if not channels_first:
        offsets = offsets.permute(*range(1, len(patch) + 1), 0)
    expected = bool(torch.equal(offsets.flatten(), torch.arange(chans * math.prod(patch))))
    assert layout.flat_in(strides, chans, patch, channels_first) == expected


@pytest.mark.parametrize("name", ["linear", "linear-1d", "linear-3d"])
def test_linear_strides_follow_the_patch_major_order(name) -> None:
    """A Linear weight's element (c, *patch) sits at column (flattened patch index) * C + c."""
    make, chans, patch = WEIGHTS[name]
    w = torch.arange(20 * chans * math.prod(patch)).reshape(20, -1)
    strides = layout.element_strides(w, chans, patch)
    for c, *pos in itertools.product(range(chans), *map(range, patch)):
        flat = 0
        for p, n in zip(pos, patch, strict=True):
            flat = flat * n + p
        offset = c * strides[0] + sum(p * s for p, s in zip(pos, strides[1:], strict=True))
        assert offset == flat * chans + c


def test_k_order_policy() -> None:
    """Channels-first where the image has contiguous rows and either nothing needs re-laying (a
    conv weight, no pre-norm parameters) or the call is large; re-laid operands are exact
    copies."""
    small, large = torch.randn(2, 3, 8, 8), torch.randn(40, 3, 32, 32)  # 8 and 2560 tokens
    nhwc = large.to(memory_format=torch.channels_last)
    linear, conv = torch.randn(16, 48), torch.randn(16, 3, 4, 4)
    g1, b1 = torch.randn(48), torch.randn(48)
    pol = policy.current()
    assert large.shape[0] * 64 >= pol.relayout_min_tokens > 8

    k = layout.k_order(small, conv, None, None, layout.geometry(small, (4, 4)), pol)
    assert (k.channels_first, k.w_flat) == (True, True) and k.weight is conv
    k = layout.k_order(small, conv, g1, b1, layout.geometry(small, (4, 4)), pol)
    assert (k.channels_first, k.w_flat) == (False, False) and k.g1 is g1
    k = layout.k_order(small, linear, g1, b1, layout.geometry(small, (4, 4)), pol)
    assert (k.channels_first, k.w_flat) == (False, True) and k.weight is linear
    k = layout.k_order(nhwc, linear, g1, b1, layout.geometry(nhwc, (4, 4)), pol)
    assert (k.channels_first, k.w_flat) == (False, True)
    k = layout.k_order(large, linear, g1, b1, layout.geometry(large, (4, 4)), pol)
    assert (k.channels_first, k.w_flat) == (True, True)
    # Channels-first element e of the re-laid operands is element (i, j, c) of the originals.
    c, i, j = 2, 1, 3
    e, orig = (c * 4 + i) * 4 + j, (i * 4 + j) * 3 + c
    assert torch.equal(k.weight.reshape(16, 48)[:, e], linear[:, orig])
    assert k.g1[e] == g1[orig] and k.b1[e] == b1[orig]


def test_k_order_re_lays_only_the_parameters_that_exist() -> None:
    """LayerNorm(bias=False) has a weight only: the missing bias stays None."""
    large, linear, g1 = torch.randn(40, 3, 32, 32), torch.randn(16, 48), torch.randn(48)
    k = layout.k_order(large, linear, g1, None, layout.geometry(large, (4, 4)), policy.current())
    assert k.channels_first and k.b1 is None and k.g1.shape == g1.shape


def test_large_calls_realign_weight_rows() -> None:
    """A weight whose rows are not 16-element aligned (here K = 18; vit_l14 has 588) is copied
    into padded rows for large calls; patch width 3 keeps the patch-major order."""
    x, w = torch.randn(400, 3, 8, 9), torch.randn(10, 18)  # 400 * 12 tokens, patch (2, 3)
    pol = policy.current()
    k = layout.k_order(x, w, None, None, layout.geometry(x, (2, 3)), pol)
    assert not k.channels_first and k.w_flat and k.weight.stride() == (32, 1)
    assert k.w_row_len == 32 and torch.equal(k.weight, w)
    padded = k.weight.as_strided((10, 32), (32, 1))  # the kernels read W rows up to w_row_len
    assert torch.equal(padded[:, 18:], torch.zeros(10, 14))
    small = layout.k_order(x[:2], w, None, None, layout.geometry(x[:2], (2, 3)), pol)
    assert small.weight is w and not small.channels_first


@pytest.mark.parametrize("channels_first", [False, True])
def test_relaid_3d_weight_is_the_same_projection(channels_first) -> None:
    conv = torch.randn(5, 3, 2, 4, 2)
    copy = layout.relaid(conv, 3, (2, 4, 2), channels_first)
    strides = layout.element_strides(copy, 3, (2, 4, 2))
    assert layout.flat_in(strides, 3, (2, 4, 2), channels_first)
    assert copy.stride(0) % layout.W_ROW_ALIGN == 0
    expected = conv if channels_first else conv.permute(0, 2, 3, 4, 1).reshape(5, -1)
    assert torch.equal(copy, expected)


def test_token_strides_flat_only_when_rows_are_evenly_spaced() -> None:
    assert layout.token_strides(torch.empty(2, 6, 16))[1]
    assert layout.token_strides(torch.empty(()).expand(2, 6, 16))[1]  # y.sum().backward()
    assert layout.token_strides(torch.empty(1, 6, 16).expand(2, 6, 16))[1] is False
    assert layout.token_strides(torch.empty(6, 2, 16).transpose(0, 1))[1] is False


def test_geometry_of_any_rank() -> None:
    geo = layout.geometry(torch.empty(2, 3, 8, 12, 20), (2, 4, 5))
    assert geo.grid == (4, 3, 4) and geo.per_image == 48 and geo.tokens == 96
    assert geo.patch_dim == 3 * 40
    assert layout.geometry(torch.empty(3, 2, 30), [5]).grid == (6,)
