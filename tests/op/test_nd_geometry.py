"""The op's kernels and layout take any number of spatial dimensions: sequences (B, C, L) and
volumes (B, C, T, H, W), a volume read through the (B, T, C, H, W) layout video models permute
from, and a Conv3d weight read in place, against the fp64 eager math. (The modules and the
functional API accept images only so far; these drive the op directly.)"""

from __future__ import annotations

import pytest
import torch

from zeta_fused.kernels.contract import LAYER_NORM, NO_NORM
from zeta_fused.op import policy
from zeta_fused.op.args import BwdArgs, FwdArgs, Grads
from zeta_fused.op.reference import backward_from_stats, forward_with_stats

CASES = {  # (input shape, patch, weight as conv?, input permutation)
    "1d": ((2, 3, 24), (4,), False, None),
    "1d-conv1d": ((2, 3, 24), (6,), True, None),
    "3d": ((2, 3, 4, 8, 6), (2, 4, 3), False, None),
    "3d-conv3d": ((1, 2, 4, 8, 8), (2, 4, 4), True, None),
    "3d-btchw": ((2, 3, 4, 8, 8), (2, 4, 4), True, (0, 2, 1, 3, 4)),
}


def make_args(name: str, device: str, norms=(LAYER_NORM, LAYER_NORM)) -> FwdArgs:
    shape, patch, conv, perm = CASES[name]
    chans = shape[1]
    if perm is None:
        x = torch.randn(shape, dtype=torch.float64)
    else:  # stored as (B, T, C, H, W), viewed as (B, C, T, H, W)
        stored = [shape[i] for i in perm]
        x = torch.randn(stored, dtype=torch.float64).permute(*perm)
    K, D = chans * int(torch.tensor(patch).prod()), 20
    w = torch.randn(D, chans, *patch) if conv else torch.randn(D, K)
    w = w.double() / K**0.5

    def vec(n):
        return torch.randn(n, dtype=torch.float64)

    pre, post = norms
    return FwdArgs(
        x=x.to(device), weight=w.to(device), bias=vec(D).to(device), pre_norm=pre,
        g1=(1 + 0.2 * vec(K)).to(device), b1=vec(K).to(device), pre_eps=1e-5, post_norm=post,
        g2=(1 + 0.2 * vec(D)).to(device), b2=vec(D).to(device), post_eps=1e-5, pos=None,
        keep=None, pos_index=None, prefix=None, stem_norm="none", g3=None, b3=None,
        stem_eps=1e-5, patch=patch, compute_dtype=torch.float64, out_dtype=torch.float64,
    )  # fmt: skip


def on_cpu(a):
    return tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in a)


@pytest.mark.parametrize("relayout", [False, True], ids=["small-call", "re-laid"])
@pytest.mark.parametrize("name", CASES)
def test_forward_and_gradients_match_the_eager_math(name, relayout, device) -> None:
    args = make_args(name, device)
    with policy.override(relayout_min_tokens=0 if relayout else 2**31):
        y, stats = torch.ops.zeta_fused.patch_embed_fwd(*args)
        dy = torch.randn_like(y)
        grads = torch.ops.zeta_fused.patch_embed_bwd(*BwdArgs(dy, stats, True, *args))
    ref_y, ref_stats = forward_with_stats(FwdArgs(*on_cpu(args)))
    torch.testing.assert_close(y.cpu(), ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.cpu(), ref_stats, rtol=1e-10, atol=1e-10)
    ref = backward_from_stats(BwdArgs(dy.cpu(), ref_stats, True, *on_cpu(args)))
    for field, got, want in zip(Grads._fields, grads, ref, strict=True):
        assert got.shape == want.shape, field
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9, msg=field)


@pytest.mark.parametrize("norms", [(NO_NORM, NO_NORM), (NO_NORM, LAYER_NORM)], ids=str)
def test_3d_without_norms(norms, device) -> None:
    args = make_args("3d-btchw", device, norms)
    y, _ = torch.ops.zeta_fused.patch_embed_fwd(*args)
    torch.testing.assert_close(y.cpu(), forward_with_stats(FwdArgs(*on_cpu(args)))[0])


def test_reference_patch_order_is_vit_pytorch_3d() -> None:
    """The eager math flattens (pf p1 p2 c), as vit-pytorch's ViT for video does."""
    from einops import rearrange

    from zeta_fused.op.reference import patchify

    x = torch.randn(2, 3, 4, 8, 6)
    expected = rearrange(x, "b c (f pf) (h p1) (w p2) -> b (f h w) (pf p1 p2 c)", pf=2, p1=4,
                         p2=3)  # fmt: skip
    assert torch.equal(patchify(x, (2, 4, 3)), expected)
