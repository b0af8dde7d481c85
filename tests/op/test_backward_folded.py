"""The backward's folded dW GEMM and its finishing sums (kernels/patch_embed_bwd_dw.py,
kernels/patch_embed_bwd_params.py, docs/design.md "Backward"): the image and Ẑ = dZ * rstd1
straight into the product, the centring subtracted chunk by chunk, the tokens it would cancel on
taken by a second loop; token splits, several weight tiles and persistent dZ programs summed in
a fixed order inside the kernels."""

from __future__ import annotations

import pytest
import torch
from support import HOSTILE, compare, hostile_image, make

from zeta_fused.op import bound, policy

SMALL = dict(dz_m=16, dw_m=16, dw_d=16, dw_k=16, param_d=16)
# Tiny tiles, so that small images take every path: two token tiles per chunk of the centred
# fold, a token split per tile and several weight tiles (each finished by its last split, the
# columns of dg1 and db1 by their last weight tile), two dZ programs that take turns over the
# token tiles (their column partials added up in place).
SPLIT = dict(dw_chunk_tokens=32, dw_target_programs=2**20, dz_programs=2, colsum_c=16,
             table_n=16, table_d=16, table_b=2, blocks_16bit=SMALL, blocks_32bit=SMALL)  # fmt: skip


@pytest.fixture(params=[{}, SPLIT], ids=["default tiles", "chunks and splits"])
def tiling(request):
    with policy.override(**request.param):
        yield


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.usefixtures("tiling")
def test_inputs_where_the_fold_could_cancel(kind, dtype, device) -> None:
    """bf16 images take the folded GEMM (flat patches and constant borders: its second loop),
    fp16 and fp32 ones the normalising one; every gradient within the accuracy rule."""
    compare(make(3, 40, 4), hostile_image(kind), dtype, device)


@pytest.mark.usefixtures("tiling")
def test_constant_patches_far_from_zero(device) -> None:
    """Constant patches at 8160 (exact in bf16): |mean| * rstd is 2.6e6, and the centred fold's
    subtraction would leave fp32 rounding of 8160 * rstd per token where the eager module has
    x̂ = 0. They take the second loop; the others the fold."""
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    x[:, :, :8, :8] = 8160.0
    compare(make(3, 24, 4), x, torch.bfloat16, device)


@pytest.mark.parametrize("flags", [(True, False, False), (False, True, True), (True, True, True)],
                         ids=["pre-norm only", "post-norm and bias", "all"])  # fmt: skip
@pytest.mark.usefixtures("tiling")
def test_folded_gradients_without_image_gradient(flags, device) -> None:
    compare(make(3, 24, 4, flags), torch.randn(2, 3, 16, 12), torch.bfloat16, device, False)


def launched_forms(monkeypatch) -> list[dict]:
    forms = []
    real = bound.launch

    def spy(kernel, grid, *args, **kwargs):
        if getattr(getattr(kernel, "fn", None), "__name__", "") == "_bwd_dw_kernel":
            forms.append({k: kwargs[k] for k in ("FOLD", "CENTRED")})
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(bound, "launch", spy)
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
