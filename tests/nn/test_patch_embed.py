"""PatchEmbeddings on its eager path: API, seq_len semantics, layouts, state dicts, peers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import layer_norm, randomise
from torch import nn

from zeta_fused import PatchEmbeddings, patch_embed
from zeta_fused.op.reference import patch_embed_reference


def test_seed_example() -> None:
    from zeta_fused.vision import PatchEmbeddings as FromVision

    assert FromVision is PatchEmbeddings
    out = PatchEmbeddings(3, 64, 16)(torch.randn(32, 3, 224, 224))
    assert out.shape == (32, 3136, 64)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("seq_len", "patch_size", "expected"),
    [
        (16, None, (4, 4)),
        (196, None, (14, 14)),
        (None, 8, (8, 8)),
        (12, (3, 4), (3, 4)),
        (None, (2, 5), (2, 5)),
    ],
)
def test_seq_len_semantics(seq_len, patch_size, expected) -> None:
    m = PatchEmbeddings(3, 32, seq_len, patch_size=patch_size)
    assert m.patch_size == expected
    assert m.embedding[2].in_features == 3 * expected[0] * expected[1]


def test_state_dict_keys_match_zeta() -> None:
    keys = set(PatchEmbeddings(3, 64, 16).state_dict())
    assert keys == {f"embedding.{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    bare = PatchEmbeddings(3, 64, 16, pre_norm=False, post_norm=False, bias=False)
    assert set(bare.state_dict()) == {"embedding.2.weight"}
    assert isinstance(bare.embedding[1], nn.Identity) and isinstance(bare.embedding[3], nn.Identity)


def test_state_dict_round_trip() -> None:
    a = randomise(PatchEmbeddings(3, 48, patch_size=(4, 2)))
    b = PatchEmbeddings(3, 48, patch_size=(4, 2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_device_and_dtype_kwargs() -> None:
    m = PatchEmbeddings(3, 16, 4, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    ("B", "C", "H", "W", "patch", "D"),
    [
        (0, 3, 16, 16, 4, 8),
        (1, 1, 16, 16, 4, 8),
        (3, 3, 32, 48, 8, 24),
        (1, 4, 28, 28, 14, 16),
        (2, 3, 32, 32, 16, 12),
        (1, 3, 12, 20, (3, 5), 10),
        (3, 4, 14, 21, (7, 3), 33),
    ],
)
@pytest.mark.parametrize(
    "flags", [(True, True, True), (False, False, False), (False, True, True), (True, False, False)]
)
def test_eager_matches_reference(B, C, H, W, patch, D, flags) -> None:
    pre, post, bias = flags
    m = randomise(PatchEmbeddings(C, D, patch_size=patch, pre_norm=pre, post_norm=post, bias=bias))
    x = torch.randn(B, C, H, W)
    y = m(x)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    assert y.shape == (B, (H // ph) * (W // pw), D)
    e = m.embedding
    ref = patch_embed_reference(
        x,
        (ph, pw),
        e[2].weight,
        e[2].bias,
        layer_norm(e[1].weight, e[1].bias) if pre else None,
        layer_norm(e[3].weight, e[3].bias) if post else None,
    )
    torch.testing.assert_close(y, ref)
    fn = patch_embed(
        x,
        patch,
        e[2].weight,
        e[2].bias,
        (e[1].weight, e[1].bias) if pre else None,
        (e[3].weight, e[3].bias) if post else None,
        backend="eager",
    )
    torch.testing.assert_close(fn, ref)


def test_reference_flatten_order_matches_conv2d() -> None:
    """A Conv2d weight (D, C, ph, pw) maps to W = weight.permute(0, 2, 3, 1).reshape(D, K)."""
    conv = nn.Conv2d(3, 20, kernel_size=(4, 2), stride=(4, 2))
    x = torch.randn(2, 3, 16, 10)
    expected = conv(x).flatten(2).transpose(1, 2)
    w = conv.weight.permute(0, 2, 3, 1).reshape(20, -1)
    torch.testing.assert_close(patch_embed_reference(x, (4, 2), w, conv.bias), expected)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_strided_inputs(layout) -> None:
    m = randomise(PatchEmbeddings(3, 16, 16))
    base = torch.randn(2, 3, 40, 36)
    if layout == "channels_last":
        x = base[..., :32, :32].contiguous().to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[:, :, 4:36:1, 2:34]
    else:
        x = base[..., :32, :32].transpose(-1, -2)
    torch.testing.assert_close(m(x), m(x.contiguous()))


def test_dynamic_img_pad_matches_timm_zero_padding() -> None:
    m = randomise(PatchEmbeddings(3, 16, patch_size=4, dynamic_img_pad=True))
    x = torch.randn(2, 3, 13, 10)
    y = m(x)
    assert y.shape == (2, 4 * 3, 16)
    torch.testing.assert_close(y, m.embedding(F.pad(x, (0, 2, 0, 3))))


def test_empty_batch() -> None:
    m = PatchEmbeddings(3, 16, 16)
    y = m(torch.randn(0, 3, 32, 32))
    assert y.shape == (0, 64, 16)


def test_matches_vit_pytorch_to_patch_embedding() -> None:
    ViT = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra").ViT

    vit = ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=1, heads=2, mlp_dim=64)
    stem = randomise(vit.to_patch_embedding)
    m = PatchEmbeddings(3, 64, 64)
    m.load_state_dict({f"embedding.{k}": v for k, v in stem.state_dict().items()})
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(m(x), stem(x), rtol=0, atol=0)
    torch.testing.assert_close(
        m(x),
        patch_embed(
            x,
            8,
            m.embedding[2].weight,
            m.embedding[2].bias,
            (stem[1].weight, stem[1].bias),
            (stem[3].weight, stem[3].bias),
        ),
    )


def test_matches_vit_pytorch_non_square_patch() -> None:
    ViT = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra").ViT

    vit = ViT(
        image_size=(24, 30),
        patch_size=(6, 5),
        num_classes=10,
        dim=32,
        depth=1,
        heads=2,
        mlp_dim=32,
        channels=4,
    )
    stem = randomise(vit.to_patch_embedding)
    m = PatchEmbeddings(4, 32, patch_size=(6, 5))
    m.load_state_dict({f"embedding.{k}": v for k, v in stem.state_dict().items()})
    x = torch.randn(2, 4, 24, 30)
    torch.testing.assert_close(m(x), stem(x), rtol=0, atol=0)


def test_gradients_flow_on_eager_path() -> None:
    m = randomise(PatchEmbeddings(3, 16, 16))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())


def test_parametrized_and_weight_normed_layers_fuse(device) -> None:
    """The fused path reads parameters the way nn.Module does: a parametrization (a property)
    and weight_norm (an attribute recomputed by a pre-hook) are seen, not the raw tensors."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Doubled(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    m = randomise(PatchEmbeddings(3, 16, patch_size=4)).to(device)
    parametrize.register_parametrization(m.embedding[1], "weight", Doubled())
    weight_norm(m.embedding[2])
    x = torch.randn(2, 3, 8, 12, device=device)
    m.backend = "eager"
    ref = m(x)
    m.backend = "triton"
    torch.testing.assert_close(m(x), ref)
    m.embedding[2].parametrizations.weight.original0.data.mul_(3)  # the magnitude g
    m.backend = "eager"
    ref = m(x)
    m.backend = "triton"
    torch.testing.assert_close(m(x), ref)
