"""The folded forward (kernels/patch_embed_fwd.py, docs/design.md "Forward main loop"): the raw
patch tile into the product, the pre-norm folded into the epilogue, its statistics from the
same tiles; every way it tiles a row; inputs on which the fold could cancel."""

from __future__ import annotations

import pytest
import torch
from support import HOSTILE, assert_accurate, check, hostile_image, make

from zeta_fused.functional import op_inputs
from zeta_fused.kernels.contract import LAYER_NORM, RMS_NORM
from zeta_fused.op import layout, policy
from zeta_fused.op.args import Norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TINY = dict(fwd_m=16, fwd_n=16, fwd_small_m=16, fwd_small_n=16, fwd_k=16)
# Every way the forward covers a row, with 16-wide tiles so that tiny shapes take them all.
TILINGS = {
    "owned rows, paired tiles": dict(small_grid=0, blocks_16bit=TINY, blocks_32bit=TINY),
    "owned rows, single tiles": dict(
        small_grid=0,
        blocks_16bit=TINY | {"fwd_pair": False},
        blocks_32bit=TINY | {"fwd_pair": False},
    ),
    "rows shared by programs": dict(
        small_grid=2**31, fwd_target_programs=2**20, blocks_16bit=TINY, blocks_32bit=TINY
    ),
    "whole rows": dict(small_grid=0),
}


@pytest.fixture(params=list(TILINGS.values()), ids=list(TILINGS))
def tiling(request):
    with policy.override(**request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", [(True, True, True), (True, False, True), (False, True, False)],
                         ids=["pre+post", "pre only", "post only"])  # fmt: skip
def test_every_tiling(tiling, flags, dtype, device) -> None:
    """D = 72: four and a half 16-wide tiles (a ragged last one, an odd count for pairs)."""
    check(make(3, 72, 4, flags), torch.randn(3, 3, 12, 16), dtype, device)


def test_tilings_agree_on_the_saved_statistics(device) -> None:
    """The backward reads the forward's row statistics: every tiling saves the same ones."""
    m = make(3, 72, 4).to(device, torch.float32)
    x = torch.randn(3, 3, 12, 16, device=device)
    args = op_inputs(x, (4, 4), m.embedding[2].weight, m.embedding[2].bias,
                     *(Norm(LAYER_NORM, n.weight, n.bias, 1e-5) for n in
                       (m.embedding[1], m.embedding[3])))  # fmt: skip
    results = []
    for changes in TILINGS.values():
        with policy.override(**changes):
            results.append(torch.ops.zeta_fused.patch_embed_fwd(*args))
    for y, stats in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats, results[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", HOSTILE)
def test_inputs_where_the_fold_could_cancel(kind, dtype, device) -> None:
    """fp32 inputs take the shifted operand, fp16/bf16 the raw one; both within the accuracy
    rule with each norm over D and without."""
    check(make(3, 40, 4), hostile_image(kind), dtype, device)
    check(make(3, 40, 4, (True, False, False)), hostile_image(kind), dtype, device)


@pytest.mark.parametrize("kind", ["raw pixels", "flat patches", "outlier pivot"])
def test_autocast_from_fp32_inputs(kind, device) -> None:
    """fp32 images and parameters, a bf16 product (autocast): the patches are not exact in the
    operand dtype, so they are shifted by their pivot before rounding."""
    m = make(3, 40, 4).float().to(device)
    x = hostile_image(kind).float().to(device)
    ref = m.double()(x.double())
    m.float()
    with torch.autocast(device, dtype=torch.bfloat16):
        m.backend = "eager"
        eager = m(x)
        m.backend = "triton"
        fused = m(x)
    assert fused.dtype == eager.dtype
    assert_accurate(fused, eager, ref, torch.bfloat16, kind)


@pytest.mark.parametrize("kind", [LAYER_NORM, RMS_NORM])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no affine"])
def test_fold_outputs(kind, affine, device) -> None:
    """The folded weight (rounded once, in the image's K order, zero-padded rows), its row
    sums (of the rounded values) and W @ b1 + bias."""
    from zeta_fused.op import launch, launch_fwd, workspace

    torch.manual_seed(1)
    d, chans, patch = 24, 3, (4, 4)
    k = chans * 16
    x = torch.randn(2, chans, 8, 8, device=device, dtype=torch.bfloat16)
    w = torch.randn(d, k, device=device, dtype=torch.bfloat16)
    bias = torch.randn(d, device=device, dtype=torch.bfloat16)
    g1 = torch.randn(k, device=device, dtype=torch.bfloat16) if affine else None
    with_b1 = affine and kind == LAYER_NORM
    b1 = torch.randn(k, device=device, dtype=torch.bfloat16) if with_b1 else None
    a = op_inputs(x, patch, w, bias, Norm(kind, g1, b1, 1e-5), None)
    call = launch_fwd.fwd_call(a, policy.for_tensor(x), with_stats=False)
    assert call.main_consts["CHANNELS_FIRST"] and call.main_consts["W_FLAT"]
    assert call.fold.row_len % layout.W_ROW_ALIGN == 0
    _, (folded_w, colsum, new_bias, _, _) = workspace.carve(x, call.scratch, views=True)
    proj = launch_fwd.launch_fold(launch._fold_weight_kernel, call, a, folded_w, colsum,
                                  new_bias, None)  # fmt: skip
    # The (c, i, j) order of the image's pixel rows; rows zero beyond K.
    folded = (w.float() * (1 if g1 is None else g1.float())).to(torch.bfloat16)
    by_channel = folded.view(d, 4, 4, chans).permute(0, 3, 1, 2).reshape(d, k)
    assert torch.equal(proj.weight[:, :k].cpu(), by_channel.cpu())
    assert not proj.weight[:, k:].any()
    if kind == LAYER_NORM:
        torch.testing.assert_close(proj.colsum, folded.float().sum(1), rtol=1e-6, atol=1e-5)
    else:
        assert proj.colsum is None
    want = bias.float() if b1 is None else w.float() @ b1.float() + bias.float()
    torch.testing.assert_close(proj.bias.float(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("conv", [True, False], ids=["conv weight", "linear weight"])
def test_nothing_to_fuse_runs_as_the_gemm(conv, device, monkeypatch) -> None:
    """Rows already cut with no norm, table or prefix (Qwen-VL vision towers): the op is the
    GEMM itself, run as F.linear (cuBLAS on a GPU) with no kernel launched; a pre-norm gives
    the kernels something to fuse again, and the policy can turn the GEMM path off."""
    from zeta_fused import patch_embed_rows
    from zeta_fused.op import launch

    launched = []
    real = launch._patch_embed_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(launch, "_patch_embed_fwd_kernel", Spy())
    rows = torch.randn(10, 3 * 2 * 4 * 4, device=device)
    w = torch.randn(24, 3, 2, 4, 4, device=device) if conv else torch.randn(24, 96, device=device)
    bias = torch.randn(24, device=device)
    with torch.no_grad():
        y = patch_embed_rows(rows, w, bias, backend="triton")
    assert not launched
    assert torch.equal(y, torch.nn.functional.linear(rows, w.reshape(24, -1), bias))
    with torch.no_grad(), policy.override(cublas_plain_gemm=False):
        fused = patch_embed_rows(rows, w, bias, backend="triton")
    assert launched
    torch.testing.assert_close(fused, y, rtol=1e-5, atol=1e-5)
    launched.clear()
    norm = (torch.ones(96, device=device), torch.zeros(96, device=device))
    with torch.no_grad():
        patch_embed_rows(rows, w, bias, pre_norm=norm, backend="triton")
    assert launched
