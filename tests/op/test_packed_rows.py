"""Packed and variable-resolution rows: ``patch_embed_rows(rows, ..., pos=table, pos_index=i)``
adds row ``i[r]`` of a (T, D) table to token r (several images packed into one call, each with
its own table rows), and ``patch_embed(..., pos_index=)`` does the same per image: forward and
every gradient against the fp64 reference, the op's eager math, and the errors."""

from __future__ import annotations

import pytest
import torch
from support import assert_accurate, assert_kernels_match_eager_math

from zeta_fused import patch_embed, patch_embed_rows
from zeta_fused.functional import op_inputs
from zeta_fused.op.args import Stem

# Two images of 3x4 and 2x2 patches (16 rows), each with the rows of a table resized for it,
# stored one after the other (T = 12 + 4 + 3 unused rows).
SIZES = ((3, 4), (2, 2))


def packed(dim: int = 40):
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(16, 3 * 2 * 4 * 4, generator=g, dtype=torch.float64)
    weight = torch.randn(dim, 3, 2, 4, 4, generator=g, dtype=torch.float64) / 10
    bias = torch.randn(dim, generator=g, dtype=torch.float64)
    table = torch.randn(19, dim, generator=g, dtype=torch.float64)
    index = torch.cat([torch.arange(12), 12 + torch.tensor([3, 2, 1, 0])])  # any order
    return rows, weight, bias, table, index


def run(dtype, device, backend, dim=40):
    rows, weight, bias, table, index = packed(dim)
    leaves = [t.to(device, dtype).requires_grad_() for t in (rows, weight, bias, table)]
    y = patch_embed_rows(leaves[0], leaves[1], leaves[2], pos=leaves[3],
                         pos_index=index.to(device), backend=backend)  # fmt: skip
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return [y, *torch.autograd.grad(y, leaves, dy.to(device, y.dtype))]


@pytest.mark.parametrize("dim", [40, 300], ids=["one tile", "wide rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_rows_forward_and_gradients(dim, dtype, device) -> None:
    ref = run(torch.float64, "cpu", "eager", dim)
    eager = run(dtype, "cpu", "eager", dim)
    fused = run(dtype, device, "triton", dim)
    for name, f, e, r in zip(("y", "rows", "weight", "bias", "table"), fused, eager, ref,
                             strict=True):  # fmt: skip
        assert f.dtype == e.dtype, name
        assert_accurate(f, e, r, dtype, name)
    assert fused[4][16:].abs().max() == 0, "unused table rows get no gradient"


def test_rows_with_a_table_of_their_own(device) -> None:
    """Without pos_index the table has a row per row of patches."""
    rows, weight, _, table, _ = packed()
    rows, weight, table = rows.float().to(device), weight.float().to(device), table.float()
    got = patch_embed_rows(rows, weight, pos=table[:16].to(device), backend="triton")
    want = patch_embed_rows(rows, weight, backend="eager") + table[:16].to(device)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"a row per row of patches, \(16, D\), got \(19, 40\)"):
        patch_embed_rows(rows, weight, pos=table.to(device), backend="triton")


def test_images_with_a_table_index(device) -> None:
    """patch_embed: each image's tokens take the rows pos_index names (a table resized per
    image, concatenated), equal to adding those rows by hand."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g).to(device)
    w = torch.randn(24, 48, generator=g).to(device)
    table = torch.randn(10, 24, generator=g).to(device)
    index = torch.tensor([[0, 1, 2, 3], [9, 8, 7, 6]], device=device)
    got = patch_embed(x, 4, w, pos=table, pos_index=index, backend="triton")
    want = patch_embed(x, 4, w, backend="eager") + table[index]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernels_match_the_ops_eager_math(device) -> None:
    rows, weight, bias, table, index = packed(300)
    x = rows.view(16, 3, 2, 4, 4).to(device)
    stem = Stem(table.to(device), None, None, index.view(16, 1).to(device))
    args = op_inputs(x, (2, 4, 4), weight.to(device), bias.to(device), None, None, stem)
    assert_kernels_match_eager_math(args)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_table_indices_name_the_sizes(backend, device) -> None:
    rows, weight, _, table, index = packed()
    rows, weight, table = (t.float().to(device) for t in (rows, weight, table))
    index = index.to(device)
    with pytest.raises(ValueError, match=r"pos_index holds indices outside \[0, 19\)"):
        patch_embed_rows(rows, weight, pos=table, pos_index=index + 5, backend=backend)
    with pytest.raises(ValueError, match=r"pos_index must have shape \(L,\) = \(16,\)"):
        patch_embed_rows(rows, weight, pos=table, pos_index=index[:3], backend=backend)
    with pytest.raises(ValueError, match="pos_index needs a position table"):
        patch_embed_rows(rows, weight, pos_index=index, backend=backend)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_pre_norm_vectors_are_in_the_rows_order_for_both_weight_forms(backend, device) -> None:
    """A pre-norm's (K,) vectors apply to the rows' own values in their order, whether the
    weight is the conv's (D, C, T, P, P) or its flatten(1): the same tokens and gradients as
    LayerNorm then Linear over the rows."""
    on = "cpu" if backend == "eager" else device
    rows, weight, bias, _, _ = packed()
    g1, b1 = torch.randn(2, 96, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (rows, g1, b1)]
    want = torch.nn.functional.linear(
        torch.nn.functional.layer_norm(rows, (96,), g1, b1), weight.flatten(1), bias
    )
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want_grads = torch.autograd.grad(want, inputs, dy)
    for form in (weight, weight.flatten(1)):
        leaves = [t.detach().to(on).requires_grad_() for t in inputs]
        y = patch_embed_rows(leaves[0], form.to(on), bias.to(on), (leaves[1], leaves[2]),
                             backend=backend)  # fmt: skip
        torch.testing.assert_close(y.detach().cpu(), want.detach())
        for got, expected in zip(torch.autograd.grad(y, leaves, dy.to(on)), want_grads,
                                 strict=True):  # fmt: skip
            torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_no_rows(backend, device) -> None:
    """An empty shard: (0, K) rows give (0, D) tokens, as F.linear does, for either weight
    form, with a table index too."""
    on = "cpu" if backend == "eager" else device
    rows, weight, bias, table, _ = packed()
    rows = rows[:0].to(on).requires_grad_()
    for form in (weight, weight.flatten(1)):
        y = patch_embed_rows(rows, form.to(on), bias.to(on), backend=backend)
        assert y.shape == (0, 40)
        y.sum().backward()
        assert rows.grad.shape == (0, 96)
        index = torch.zeros(0, dtype=torch.int64, device=on)
        y = patch_embed_rows(rows, form.to(on), pos=table.to(on), pos_index=index,
                             backend=backend)  # fmt: skip
        assert y.shape == (0, 40)
