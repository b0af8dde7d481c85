"""LayerNorms without their affine parts (``elementwise_affine=False``, as diffusers' DiT, SD3
and PixArt stems use, and ``bias=False``) before and after the projection: forward, every
gradient, the op's checks, and conversion of the stems that carry them."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from einops.layers.torch import Rearrange
from support import check, compare, layer_norm, randomise
from torch import nn

from zeta_fused import FusedPatchSequential, fuse_patch_embeddings, patch_embed
from zeta_fused.functional import op_inputs
from zeta_fused.op.reference import PATCHIFY

NORMS = {
    "affine": lambda n: nn.LayerNorm(n),
    "no-affine": lambda n: nn.LayerNorm(n, elementwise_affine=False),
    "no-bias": lambda n: nn.LayerNorm(n, bias=False),
    "off": lambda n: nn.Identity(),
}


def stem(C: int, D: int, patch: tuple[int, int], pre: str, post: str, bias=True) -> nn.Module:
    """vit-pytorch's stem with the given norms, fp64, perturbed parameters."""
    K = C * patch[0] * patch[1]
    m = FusedPatchSequential(
        Rearrange(PATCHIFY, p1=patch[0], p2=patch[1]),
        NORMS[pre](K),
        nn.Linear(K, D, bias=bias),
        NORMS[post](D),
    )
    return randomise(m, 0.2).double()


VARIANTS = [
    ("no-affine", "no-affine"),
    ("no-affine", "off"),
    ("off", "no-affine"),
    ("no-bias", "no-bias"),
    ("affine", "no-affine"),
    ("no-affine", "no-bias"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norms", VARIANTS, ids=str)
def test_forward(norms, dtype, device) -> None:
    check(stem(3, 40, (4, 2), *norms), torch.randn(2, 3, 16, 12), dtype, device)


@pytest.mark.parametrize("norms", VARIANTS, ids=str)
def test_wide_rows_forward(norms, device) -> None:
    """D = 300: the post-norm's second pass over rows wider than one tile."""
    check(stem(3, 300, (4, 4), *norms), torch.randn(1, 3, 8, 8), torch.float32, device)


@pytest.mark.parametrize("norms", VARIANTS, ids=str)
def test_all_gradients(norms, device) -> None:
    compare(stem(3, 24, (4, 2), *norms), torch.randn(2, 3, 16, 12), torch.float32, device)


def test_gradients_in_the_channels_first_order(device) -> None:
    """Large calls re-lay the weight and whatever pre-norm parameters exist (here a weight and
    no bias) in the channels-first order."""
    from zeta_fused.op import policy

    with policy.override(relayout_min_tokens=0):
        compare(stem(3, 24, (4, 4), "no-bias", "no-affine"), torch.randn(2, 3, 16, 12),
                torch.float32, device)  # fmt: skip


def test_bf16_gradients(device) -> None:
    compare(stem(3, 24, (4, 2), "no-affine", "no-affine"), torch.randn(2, 3, 16, 12),
            torch.bfloat16, device)  # fmt: skip


def test_unnormalised_pixels(device) -> None:
    x = torch.randint(0, 256, (2, 3, 16, 16)).double()
    check(stem(3, 24, (4, 4), "no-affine", "no-affine"), x, torch.float32, device)


def test_gradcheck_fp64(device) -> None:
    m = stem(2, 6, (2, 3), "no-affine", "no-bias").to(device)
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    w, g2 = m[2].weight, m[3].weight

    def fn(x, w, g2):
        args = op_inputs(x, (2, 3), w, m[2].bias, layer_norm(None, None), layer_norm(g2, None))
        return torch.ops.zeta_fused.patch_embed_fwd(*args)[0]

    assert torch.autograd.gradcheck(fn, (x, w, g2), fast_mode=True)


def test_opcheck(device) -> None:
    m = stem(3, 12, (4, 4), "no-affine", "no-bias").to(device, torch.float32)
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    post = layer_norm(m[3].weight, None)
    args = op_inputs(x, (4, 4), m[2].weight, m[2].bias, layer_norm(None, None), post)
    torch.library.opcheck(torch.ops.zeta_fused.patch_embed_fwd.default, tuple(args))


def test_functional_affine_free_norm_is_a_norm(device) -> None:
    """``(None, None)`` is a LayerNorm without affine parts, as ``F.layer_norm`` takes it."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)
    w = torch.randn(16, 48, dtype=torch.float64, device=device)
    ref = torch.nn.functional.layer_norm(
        patch_embed(x, 4, w, backend="eager"), (16,), None, None, 1e-6
    )
    for backend in ("eager", "triton"):
        y = patch_embed(x, 4, w, None, None, (None, None), 1e-6, backend=backend)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10, msg=backend)


def test_timm_patch_embed_with_affine_free_norm_converts(device) -> None:
    timm_layers = pytest.importorskip("timm.layers", reason="timm is a test extra")
    pe = timm_layers.PatchEmbed(
        img_size=16,
        patch_size=4,
        in_chans=3,
        embed_dim=24,
        norm_layer=partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6),
    )
    pe = randomise(pe).to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    ref = pe(x)
    summary = fuse_patch_embeddings(pe, backend="triton")
    assert len(summary.converted) == 1, str(summary)
    torch.testing.assert_close(pe(x), ref, rtol=1e-4, atol=1e-5)


def test_vit_pytorch_stem_with_bias_free_norms_converts(device) -> None:
    seq = nn.Sequential(
        Rearrange(PATCHIFY, p1=4, p2=4),
        nn.LayerNorm(48, bias=False),
        nn.Linear(48, 16),
        nn.LayerNorm(16, elementwise_affine=False),
    )
    seq = randomise(seq).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    ref = seq(x)
    summary = fuse_patch_embeddings(nn.ModuleDict({"stem": seq}), backend="triton")
    assert [n for n, _ in summary.converted] == ["stem"], str(summary)
    torch.testing.assert_close(seq(x), ref, rtol=1e-4, atol=1e-5)
