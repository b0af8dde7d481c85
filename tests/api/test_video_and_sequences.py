"""Patches of any rank through the public API: sequences (B, C, L), videos and volumes
(B, C, T, H, W), the (B, T, C, H, W) layout read in place, Conv1d/Conv3d weights, and rows
already cut (Qwen-VL), against the fp64 reference with the accuracy rule, for the output and
every gradient; plus their errors."""

from __future__ import annotations

import pytest
import torch
from einops.layers.torch import Rearrange
from support import check, compare, layer_norm, randomise
from torch import nn

from zeta_fused import FusedPatchSequential, patch_embed, patch_embed_rows

PATTERNS = {  # vit-pytorch's own stems (vit_1d, vit_3d, simple_vit_3d, vivit)
    "1d": ("b c (n p) -> b n (p c)", {"p": 4}, (2, 3, 24)),
    "3d": ("b c (f pf) (h p1) (w p2) -> b (f h w) (pf p1 p2 c)", {"pf": 2, "p1": 4, "p2": 2},
           (2, 3, 4, 8, 6)),
    "3d-grid": ("b c (f pf) (h p1) (w p2) -> b f h w (pf p1 p2 c)", {"pf": 2, "p1": 2, "p2": 4},
                (1, 2, 4, 4, 8)),
    "3d-frames": ("b c (f pf) (h p1) (w p2) -> b f (h w) (pf p1 p2 c)",
                  {"pf": 1, "p1": 4, "p2": 4}, (2, 3, 3, 8, 8)),
    "3d-patch-order": ("b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)",
                       {"pf": 2, "p1": 4, "p2": 2}, (2, 3, 4, 8, 6)),
}  # fmt: skip


def stem(name: str, dim: int = 20, norms=(True, True)) -> tuple[nn.Module, torch.Tensor]:
    pattern, lengths, shape = PATTERNS[name]
    k = shape[1] * int(torch.tensor(list(lengths.values())).prod())
    layers = [
        Rearrange(pattern, **lengths),
        nn.LayerNorm(k) if norms[0] else nn.Identity(),
        nn.Linear(k, dim),
        nn.LayerNorm(dim) if norms[1] else nn.Identity(),
    ]
    m = randomise(FusedPatchSequential(*layers), 0.2).double()
    assert m.why_not_fused is None, m.why_not_fused
    return m, torch.randn(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", PATTERNS)
def test_forward(name, dtype, device) -> None:
    m, x = stem(name)
    check(m, x, dtype, device)


@pytest.mark.parametrize("name", PATTERNS)
def test_all_gradients(name, device) -> None:
    m, x = stem(name)
    compare(m, x, torch.float32, device)


@pytest.mark.parametrize("norms", [(False, False), (False, True), (True, False)], ids=str)
def test_norm_combinations_3d(norms, device) -> None:
    m, x = stem("3d", norms=norms)
    compare(m, x, torch.float32, device)


def test_video_read_in_place_from_btchw(device, monkeypatch) -> None:
    """VideoMAE, ViViT and V-JEPA 2 permute (B, T, C, H, W) to (B, C, T, H, W) before their
    Conv3d: the fused op reads that view without a copy, and its gradient lands in place."""
    conv = randomise(nn.Conv3d(3, 16, kernel_size=(2, 4, 4), stride=(2, 4, 4))).double()
    stored = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)  # (B, T, C, H, W)
    ref_x = stored.clone().requires_grad_()
    ref = conv(ref_x.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    x = stored.to(device).requires_grad_()
    w, b = conv.weight.detach().to(device).requires_grad_(), conv.bias.detach().to(device)
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: pytest.fail("copy"))
    y = patch_embed(x.permute(0, 2, 1, 3, 4), (2, 4, 4), w, b, backend="triton")
    monkeypatch.undo()
    y.backward(dy.to(device))
    torch.testing.assert_close(y.detach().cpu(), ref.detach())
    torch.testing.assert_close(x.grad.cpu(), ref_x.grad)
    torch.testing.assert_close(w.grad.cpu(), conv.weight.grad)
    assert w.grad.shape == conv.weight.shape


@pytest.mark.parametrize("pre_norm", [False, True])
def test_conv1d_weight(pre_norm, device) -> None:
    conv = randomise(nn.Conv1d(12, 16, kernel_size=8, stride=8)).double()
    x = torch.randn(3, 12, 32, dtype=torch.float64)
    norm = (torch.randn(96, dtype=torch.float64), torch.randn(96, dtype=torch.float64))
    norm = norm if pre_norm else None
    ref = patch_embed(x, 8, conv.weight, conv.bias, norm, backend="eager")
    if not pre_norm:
        torch.testing.assert_close(ref, conv(x).transpose(1, 2))
    y = patch_embed(x.to(device), 8, conv.weight.to(device), conv.bias.to(device),
                    None if norm is None else tuple(t.to(device) for t in norm),
                    backend="triton")  # fmt: skip
    torch.testing.assert_close(y.cpu(), ref)


def test_dynamic_pad_3d(device) -> None:
    m, _ = stem("3d")
    x = torch.randn(1, 3, 3, 7, 5, dtype=torch.float64)  # T, H, W not multiples of (2, 4, 2)
    args = (m[2].weight, m[2].bias, (m[1].weight, m[1].bias), (m[3].weight, m[3].bias))
    ref = patch_embed(torch.nn.functional.pad(x, (0, 1, 0, 1, 0, 1)), (2, 4, 2), *args,
                      backend="eager")  # fmt: skip
    m.to(device)
    args = (m[2].weight, m[2].bias, (m[1].weight, m[1].bias), (m[3].weight, m[3].bias))
    y = patch_embed(x.to(device), (2, 4, 2), *args, dynamic_img_pad=True, backend="triton")
    torch.testing.assert_close(y.detach().cpu(), ref.detach())


# ---------------------------------------------------------------- rows already cut


@pytest.mark.parametrize("weight_kind", ["conv3d", "linear"])
@pytest.mark.parametrize("norms", [False, True])
def test_rows(weight_kind, norms, device) -> None:
    """Qwen2/2.5/3-VL: rows of C * pt * ph * pw values, viewed as (L, C, pt, ph, pw) for a
    Conv3d; a Linear weight takes them in its own order."""
    conv = randomise(nn.Conv3d(3, 20, kernel_size=(2, 4, 4), stride=(2, 4, 4))).double()
    rows = torch.randn(10, 96, dtype=torch.float64, requires_grad=True)
    w = conv.weight if weight_kind == "conv3d" else conv.weight.flatten(1)
    k_norm = (torch.randn(96, dtype=torch.float64), torch.randn(96, dtype=torch.float64))
    d_norm = (torch.randn(20, dtype=torch.float64), None)
    pre, post = (k_norm, d_norm) if norms else (None, None)
    if not norms and weight_kind == "conv3d":
        torch.testing.assert_close(
            patch_embed_rows(rows, w, conv.bias, backend="eager"),
            conv(rows.view(-1, 3, 2, 4, 4)).view(-1, 20),
        )
    ref = patch_embed_rows(rows, w, conv.bias, pre, post, backend="eager")
    dy = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad(ref, rows, dy)

    def on(t):
        return None if t is None else t.detach().to(device)

    x = rows.detach().to(device).requires_grad_()
    y = patch_embed_rows(x, on(w), on(conv.bias), pre and tuple(map(on, pre)),
                         post and tuple(map(on, post)), backend="triton")  # fmt: skip
    assert y.shape == (10, 20)
    (grad,) = torch.autograd.grad(y, x, dy.to(device))
    torch.testing.assert_close(y.detach().cpu(), ref.detach())
    torch.testing.assert_close(grad.cpu(), ref_grad)


# ---------------------------------------------------------------- errors


def test_errors_name_the_sizes() -> None:
    w = torch.randn(8, 48)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\) for a 3-D patch, got \(1, 3, 8, 8\)"):
        patch_embed(torch.randn(1, 3, 8, 8), (2, 4, 2), w)
    with pytest.raises(
        ValueError, match=r"input size \(3, 8, 8\) is not a multiple of the patch \(2, 4, 2\)"
    ):
        patch_embed(torch.randn(1, 3, 3, 8, 8), (2, 4, 2), w)
    with pytest.raises(ValueError, match=r"weight must be \(D, C \* prod\(patch\)\) = \(D, 48\)"):
        patch_embed(torch.randn(1, 3, 4, 8, 8), (2, 4, 2), torch.randn(8, 47))
    with pytest.raises(ValueError, match="rows have 47 values each but the weight takes 48"):
        patch_embed_rows(torch.randn(5, 47), w)
    with pytest.raises(ValueError, match=r"expected rows of shape \(L, K\), got \(5, 4, 12\)"):
        patch_embed_rows(torch.randn(5, 4, 12), w)
    with pytest.raises(ValueError, match=r"\(B, C, L\) for a 1-D patch, got \(3, 4, 8, 8\)"):
        patch_embed(torch.randn(3, 4, 8, 8), (4,), torch.randn(8, 16))


# ---------------------------------------------------------------- PyTorch integration


@pytest.mark.parametrize("name", ["1d", "3d"])
def test_opcheck(name, device) -> None:
    from zeta_fused.functional import op_inputs

    m, x = stem(name)
    m = m.to(device, torch.float32)
    x = x.to(device, torch.float32).requires_grad_()
    pattern = m._plan().pattern
    args = op_inputs(x, pattern.patch, m[2].weight, m[2].bias, layer_norm(m[1].weight, m[1].bias),
                     layer_norm(m[3].weight, m[3].bias))  # fmt: skip
    torch.library.opcheck(torch.ops.zeta_fused.patch_embed_fwd.default, tuple(args))


def test_compile_fullgraph_3d(device, fused_calls) -> None:
    torch._dynamo.reset()
    m, x = stem("3d-grid")
    m = m.to(device, torch.float32)
    m.backend = "triton"
    x = x.to(device, torch.float32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, m(x))
    assert len(fused_calls) == 2 and y.shape == (1, 2, 2, 2, 20)
