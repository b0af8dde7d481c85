"""fuse_patch_embeddings on real vit-pytorch, timm and transformers models (small, random)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from support import check_drop_in, randomise
from torch import nn

from zeta_fused import FusedPatchSequential, fuse_patch_embeddings
from zeta_fused.integrations.convert import FusedPatchConv2d

# ---------------------------------------------------------------- vit-pytorch


def test_vit_pytorch_vit(device, fused_calls) -> None:
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    model = vit_pytorch.ViT(
        image_size=32, patch_size=8, num_classes=5, dim=32, depth=1, heads=2, mlp_dim=32
    )
    model, _ = check_drop_in(model, torch.randn(2, 3, 32, 32), device, fused_calls)
    assert isinstance(model.to_patch_embedding, FusedPatchSequential)
    assert set(model.to_patch_embedding.state_dict()) == {
        f"{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")
    }


def test_vit_pytorch_simple_vit_non_square(device, fused_calls) -> None:
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    model = vit_pytorch.SimpleViT(
        image_size=(24, 32), patch_size=(6, 8), num_classes=5, dim=32, depth=1, heads=2, mlp_dim=32
    )
    check_drop_in(model, torch.randn(2, 3, 24, 32), device, fused_calls)


def test_vit_pytorch_grid_layout_and_unknown_layout(device, fused_calls) -> None:
    from einops.layers.torch import Rearrange

    grid = nn.Sequential(
        Rearrange("b c (h p1) (w p2) -> b h w (p1 p2 c)", p1=4, p2=4),
        nn.LayerNorm(48),
        nn.Linear(48, 16),
        nn.LayerNorm(16),
    )
    other = nn.Sequential(
        Rearrange("b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=4, p2=4), nn.Linear(48, 16)
    )
    model = nn.ModuleDict({"grid": grid, "other": other})

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m["grid"](x).flatten(1, 2) + self.m["other"](x)

    converted, summary = check_drop_in(Both(), torch.randn(2, 3, 16, 12), device, fused_calls)
    assert [n for n, _ in summary.skipped] == ["m.other"]
    assert "Rearrange" in summary.skipped[0][1]
    assert type(converted.m["other"]) is nn.Sequential


# ---------------------------------------------------------------- timm


def _timm_patch_embed():
    return pytest.importorskip("timm.layers", reason="timm is a test extra").PatchEmbed


def _timm_vit(**kw):
    timm = pytest.importorskip("timm", reason="timm is a test extra")
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    return timm.models.vision_transformer.VisionTransformer(**(args | kw))


def test_timm_vit(device, fused_calls) -> None:
    model, summary = check_drop_in(_timm_vit(), torch.randn(2, 3, 32, 32), device, fused_calls)
    pe = model.patch_embed
    assert pe.grid_size == (4, 4) and pe.num_patches == 16 and pe.feat_ratio() == 8
    assert summary.converted[0][0] == "patch_embed"
    with pytest.raises(AssertionError) as fused_error:
        model(torch.randn(1, 3, 24, 32, device=device))
    with pytest.raises(AssertionError) as timm_error:  # the same error as timm's own module
        _timm_vit().to(device)(torch.randn(1, 3, 24, 32, device=device))
    assert str(fused_error.value) == str(timm_error.value)


def test_timm_dinov2_style_patch14(device, fused_calls) -> None:
    """DINOv2 family: patch 14, K = 588."""
    check_drop_in(
        _timm_vit(img_size=28, patch_size=14), torch.randn(2, 3, 28, 28), device, fused_calls
    )


def test_timm_dynamic_img_size(device, fused_calls) -> None:
    """dynamic_img_size: NHWC output, other image sizes accepted."""
    model, _ = check_drop_in(
        _timm_vit(dynamic_img_size=True), torch.randn(2, 3, 24, 40), device, fused_calls
    )


def test_timm_patch_embed_with_layernorm_and_padding(device, fused_calls) -> None:
    PatchEmbed = _timm_patch_embed()
    pe = PatchEmbed(
        img_size=None,
        patch_size=4,
        in_chans=3,
        embed_dim=24,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        strict_img_size=False,
        dynamic_img_pad=True,
    )
    check_drop_in(pe, torch.randn(2, 3, 13, 10), device, fused_calls)


def test_timm_unconvertible_left_alone(device) -> None:
    PatchEmbed = _timm_patch_embed()
    overlapping = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    overlapping.proj = nn.Conv2d(3, 16, kernel_size=8, stride=4, padding=2)
    batchnorm = PatchEmbed(
        img_size=32, patch_size=8, in_chans=3, embed_dim=16, norm_layer=nn.BatchNorm1d
    )
    model = nn.ModuleDict({"a": overlapping, "b": batchnorm})
    summary = fuse_patch_embeddings(model)
    assert summary.converted == []
    reasons = dict(summary.skipped)
    assert "overlapping conv" in reasons["a"] and "BatchNorm1d" in reasons["b"]
    assert type(overlapping) is PatchEmbed and type(batchnorm) is PatchEmbed


# ---------------------------------------------------------------- transformers


def _hf(name: str, **kw):
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}Model")
    args = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
    )
    return model_cls(config_cls(**(args | kw)))


@pytest.mark.parametrize("name", ["ViT", "DeiT", "Dinov2"])
def test_transformers_models(name, device, fused_calls) -> None:
    model, summary = check_drop_in(_hf(name), torch.randn(2, 3, 32, 32), device, fused_calls)
    assert summary.converted[0][0].endswith("patch_embeddings.projection")
    assert isinstance(model.embeddings.patch_embeddings.projection, FusedPatchConv2d)


def test_transformers_keeps_its_errors(device) -> None:
    model = _hf("ViT").to(device)
    bad = torch.randn(1, 4, 32, 32, device=device)
    with pytest.raises(ValueError) as before:
        model(bad)
    fuse_patch_embeddings(model, backend="triton")
    with pytest.raises(ValueError) as after:
        model(bad)
    assert str(after.value) == str(before.value)


def test_one_by_one_convs_are_not_patch_embeddings() -> None:
    """DPT's neck (as Depth Anything's and ZoeDepth's) keeps 1x1 convs named ``projection``:
    kernel = stride = 1 maps pixels, not patches, so they are left alone and not listed."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    config = transformers.DPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=16, image_size=32, patch_size=8,
                                    backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 8],
                                    fusion_hidden_size=8, head_in_index=-1)  # fmt: skip
    model = transformers.DPTForDepthEstimation(config)
    summary = fuse_patch_embeddings(model)
    assert summary.converted == [
        ("dpt.embeddings.patch_embeddings.projection", "transformers DPTViTPatchEmbeddings")
    ], str(summary)
    assert summary.skipped == [], str(summary)
    neck_convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "neck" in n]
    assert neck_convs and all(type(m) is nn.Conv2d for m in neck_convs)


def test_summary_text() -> None:
    summary = fuse_patch_embeddings(_timm_vit())
    assert "converted 1, skipped 0" in str(summary) and "patch_embed" in str(summary)
    assert fuse_patch_embeddings(nn.Linear(2, 2)).converted == []


def test_conv_semantics_kept_for_unbatched_and_tiny_inputs(device) -> None:
    model = _hf("ViT").to(device).eval()
    fuse_patch_embeddings(model, backend="triton")
    conv = model.embeddings.patch_embeddings.projection
    x = torch.randn(3, 32, 32, device=device)  # unbatched: Conv2d accepts (C, H, W)
    reference = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=8)
    torch.testing.assert_close(conv(x), reference)
    with pytest.raises(RuntimeError):  # smaller than the kernel: the conv's own error
        conv(torch.randn(1, 3, 4, 4, device=device))


def test_converted_models_compile_fullgraph(device, fused_calls) -> None:
    """Class-swapped timm and transformers stems trace without graph breaks."""
    torch._dynamo.reset()
    timm_model = randomise(_timm_vit()).eval().to(device)
    hf_embeddings = randomise(_hf("ViT")).eval().to(device).embeddings
    x = torch.randn(2, 3, 32, 32, device=device)
    for model in (timm_model, hf_embeddings):
        fuse_patch_embeddings(model, backend="triton")
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        fused_calls.clear()
        torch.testing.assert_close(compiled(x), model(x))
        assert len(fused_calls) == 2  # traced into the compiled graph once, run eagerly once
