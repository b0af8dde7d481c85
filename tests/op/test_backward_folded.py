"""The backward's folded dW GEMM and its finishing sums (kernels/patch_embed_bwd_dw.py,
kernels/patch_embed_bwd_params.py, docs/design.md "Backward"): the image and Ẑ = dZ * rstd1
straight into the product, the centring subtracted chunk by chunk, the tokens it would cancel on
taken by a second loop; token splits, several weight tiles and persistent dZ programs summed in
a fixed order inside the kernels."""

from __future__ import annotations

import pytest
import torch
from support import HOSTILE, compare, grads, hostile_image, make

from zeta_fused.op import bound, policy

SMALL = dict(dz_m=16, dw_m=16, dw_d=16, dw_k=16, param_d=16)
# Tiny tiles, so that small images take every path: chunks of two token tiles in the centred
# fold, at most two token splits per tile (with three tiles or more, a split takes several
# chunks, the last one partial), several weight tiles (each finished by its last split, the
# columns of dg1 and db1 by their last weight tile), two dZ programs that take turns over the
# token tiles (their column partials added up in place).
SPLIT = dict(dw_chunk_tokens=32, dw_target_programs=2**20, dw_max_splits=2, dz_programs=2,
             colsum_c=16, table_n=16, table_d=16, table_b=2, blocks_16bit=SMALL,
             blocks_32bit=SMALL)  # fmt: skip


def exact(m, x: torch.Tensor, dtype: torch.dtype):
    """The module and image rounded to ``dtype`` (in fp64): the reference then sees what the
    kernels see, and the eager error measures arithmetic alone, not the rounding of a hostile
    image (which would hide a wrong fold behind it)."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(dtype))
    return m, x.to(dtype).double()


@pytest.fixture(params=[{}, SPLIT], ids=["default tiles", "chunks and splits"])
def tiling(request):
    with policy.override(**request.param):
        yield


# bf16 images take the folded GEMM; fp16 ones (with a pre-norm) and fp32 ones the normalising
# loop, which cannot cancel: one kind each.
CASES = [(kind, torch.bfloat16) for kind in HOSTILE] + [
    ("flat patches", torch.float16),
    ("letterboxed", torch.float32),
]


@pytest.mark.parametrize("kind, dtype", CASES, ids=str)
@pytest.mark.usefixtures("tiling")
def test_inputs_where_the_fold_could_cancel(kind, dtype, device) -> None:
    """Every gradient within the accuracy rule (bf16: flat patches and constant borders take
    the fold's second loop)."""
    compare(*exact(make(3, 40, 4), hostile_image(kind), dtype), dtype, device)


@pytest.mark.usefixtures("tiling")
def test_constant_patches_far_from_zero(device) -> None:
    """Constant patches at 8160 and -4000 (exact in bf16): |mean| * rstd is above 1e6, and the
    centred fold's subtraction would leave fp32 rounding of 8160 * rstd per token where the
    eager module has x̂ = 0. They take the second loop (tiles of both token splits); the others
    the fold, over six token tiles: two chunks per split."""
    x = torch.randn(3, 3, 16, 32, dtype=torch.float64)
    x[:, :, :8, :8] = 8160.0
    x[1, :, 8:, 24:] = -4000.0
    compare(*exact(make(3, 24, 4), x, torch.bfloat16), torch.bfloat16, device)


def test_a_nan_pixel_spreads_as_in_eager(device) -> None:
    """A NaN pixel gives its token NaN statistics, which the fold counts as a token it would
    cancel on (second loop): every gradient has NaN where the eager module's has, no more, no
    fewer."""
    m = make(3, 24, 4).to(device, torch.bfloat16)
    x = torch.randn(2, 3, 16, 16, device=device, dtype=torch.bfloat16)
    x[1, 2, 5, 6] = float("nan")
    dy = torch.randn(2, 16, 24, device=device, dtype=torch.bfloat16)
    m.backend = "eager"
    eager = grads(m, x.requires_grad_(), dy)
    m.backend = "triton"
    for e, f in zip(eager, grads(m, x, dy), strict=True):
        assert torch.equal(e.isnan(), f.isnan())
    assert eager[1].isnan().any() and not eager[1].isnan().all()


@pytest.mark.parametrize("flags", [(True, False, False), (False, True, True), (True, True, True)],
                         ids=["pre-norm only", "post-norm and bias", "all"])  # fmt: skip
@pytest.mark.usefixtures("tiling")
def test_folded_gradients_without_image_gradient(flags, device) -> None:
    compare(make(3, 24, 4, flags), torch.randn(2, 3, 16, 12), torch.bfloat16, device, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reorders the interpreter's programs")
def test_gradients_do_not_depend_on_the_order_programs_run_in(monkeypatch) -> None:
    """The same bits when the interpreter runs every grid backwards: another token split
    finishes each weight tile and another weight tile each K tile's dg1 and db1 (the counters
    pick who sums, never the order), the column programs run after the GEMM's. The GPU's
    20-run test is in tests/op/test_backward.py."""
    from triton.runtime import interpreter

    # fp32 gradients: a change of order shows in their last bits (bf16 would round it away).
    m = make(3, 24, 4).float()
    m.backend = "triton"
    x, dy = torch.randn(3, 3, 16, 32), torch.randn(3, 32, 24)
    # Three dZ programs and four token splits: sums of three terms or more, whose order shows.
    with policy.override(**SPLIT | {"dz_programs": 3, "dw_max_splits": 4}):
        first = grads(m, x.requires_grad_(), dy)
        builder = interpreter.interpreter_builder
        forwards = builder.set_grid_idx

        def backwards(x, y, z):
            nx, ny, nz = builder.grid_dim
            forwards(nx - 1 - x, ny - 1 - y, nz - 1 - z)

        monkeypatch.setattr(builder, "set_grid_idx", backwards)
        again = grads(m, x, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def launched_forms(monkeypatch) -> list[dict]:
    forms = []
    real = bound.launch_fixed

    def spy(kernel, grid, consts, *args):
        if getattr(getattr(kernel, "fn", None), "__name__", "") == "_bwd_dw_kernel":
            forms.append({k: consts[k] for k in ("FOLD", "CENTRED")})
        return real(kernel, grid, consts, *args)

    monkeypatch.setattr(bound, "launch_fixed", spy)
    return forms


@pytest.mark.parametrize(
    "dtype, norm, fold, centred",
    [
        (torch.bfloat16, "layer", True, True),
        (torch.bfloat16, "rms", True, False),
        (torch.bfloat16, None, True, False),
        (torch.float16, None, True, False),
        (torch.float16, "layer", False, False),  # Ẑ could overflow fp16
        (torch.float32, "layer", False, False),
    ],
)
def test_which_images_fold(dtype, norm, fold, centred, device, monkeypatch) -> None:
    """The fold reads the image as stored: 16-bit images in the operand dtype, and with a
    pre-norm in bf16 only (Ẑ = dZ * rstd1 could overflow fp16)."""
    from zeta_fused import PatchEmbeddings

    forms = launched_forms(monkeypatch)
    layer = torch.nn.RMSNorm if norm == "rms" else torch.nn.LayerNorm
    m = PatchEmbeddings(3, 16, patch_size=4, pre_norm=norm is not None, norm_layer=layer,
                        backend="triton").to(device, dtype)  # fmt: skip
    m(torch.randn(2, 3, 8, 8, device=device, dtype=dtype)).sum().backward()
    assert forms == [{"FOLD": fold, "CENTRED": centred}]
