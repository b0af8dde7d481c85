"""fuse_patch_embeddings on video, sequence and vision-language stems of the real packages
(tiny random configs): same Parameters and state-dict keys, equal outputs and gradients, the
fused op run, and a reason for what is left alone."""

from __future__ import annotations

import pytest
import torch
from support import check_drop_in
from torch import nn

from zeta_fused import FusedPatchSequential, fuse_patch_embeddings
from zeta_fused.integrations.convert import FusedPatchConv3d

# ---------------------------------------------------------------- transformers


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is a test extra")


TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)


def test_videomae(device, fused_calls) -> None:
    t = _transformers()
    config = t.VideoMAEConfig(image_size=16, patch_size=4, num_frames=4, tubelet_size=2, **TINY)
    model, summary = check_drop_in(t.VideoMAEModel(config), torch.randn(2, 4, 3, 16, 16), device,
                                   fused_calls)  # fmt: skip
    assert summary.converted[0][0] == "embeddings.patch_embeddings.projection"
    assert isinstance(model.embeddings.patch_embeddings.projection, FusedPatchConv3d)


def test_vivit(device, fused_calls) -> None:
    t = _transformers()
    config = t.VivitConfig(image_size=16, num_frames=4, tubelet_size=[2, 4, 4], **TINY)
    check_drop_in(t.VivitModel(config), torch.randn(2, 4, 3, 16, 16), device, fused_calls)


def test_vjepa2_patch_embeddings(device, fused_calls) -> None:
    t = _transformers()
    vjepa2 = pytest.importorskip("transformers.models.vjepa2.modeling_vjepa2")
    config = t.VJEPA2Config(patch_size=4, tubelet_size=2, in_chans=3, crop_size=16,
                            frames_per_clip=4)  # fmt: skip
    embed = vjepa2.VJEPA2PatchEmbeddings3D(config, hidden_size=16)
    check_drop_in(embed, torch.randn(2, 3, 4, 16, 16), device, fused_calls)


QWEN = {
    "qwen2_vl": ("qwen2_vl.modeling_qwen2_vl", "PatchEmbed"),
    "qwen2_5_vl": ("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionPatchEmbed"),
    "qwen3_vl": ("qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionPatchEmbed"),
}


@pytest.mark.parametrize("name", QWEN)
def test_qwen_vl_vision_patch_embeddings(name, device, fused_calls) -> None:
    """Rows of C * pt * ph * pw values, viewed as (L, C, pt, ph, pw) for a Conv3d: one patch
    per row, read in place."""
    t = _transformers()
    module, cls = QWEN[name]
    cls = getattr(pytest.importorskip(f"transformers.models.{module}"), cls)
    if name == "qwen3_vl":
        config = t.Qwen3VLVisionConfig(patch_size=4, temporal_patch_size=2, in_channels=3,
                                       hidden_size=16)  # fmt: skip
        embed = cls(config)
    else:
        embed = cls(patch_size=4, temporal_patch_size=2, in_channels=3, embed_dim=16)
    check_drop_in(embed, torch.randn(12, 3 * 2 * 4 * 4), device, fused_calls)


# ---------------------------------------------------------------- vit-pytorch


def _vit_pytorch(module: str):
    pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    return pytest.importorskip(f"vit_pytorch.{module}")


VIDEO = dict(image_size=8, image_patch_size=4, frames=4, frame_patch_size=2, num_classes=3, dim=16,
             heads=2, mlp_dim=16)  # fmt: skip


@pytest.mark.parametrize(
    "module, cls, kw",
    [
        ("vit_3d", "ViT", dict(VIDEO, depth=1)),
        ("simple_vit_3d", "SimpleViT", dict(VIDEO, depth=1)),
        ("vivit", "ViViT", dict(VIDEO, spatial_depth=1, temporal_depth=1, use_flash_attn=False)),
    ],
    ids=["vit_3d", "simple_vit_3d", "vivit"],
)
def test_vit_pytorch_video(module, cls, kw, device, fused_calls) -> None:
    model = getattr(_vit_pytorch(module), cls)(**kw)
    model, _ = check_drop_in(model, torch.randn(2, 3, 4, 8, 8), device, fused_calls)
    assert isinstance(model.to_patch_embedding, FusedPatchSequential)


@pytest.mark.parametrize("module, cls", [("vit_1d", "ViT"), ("simple_vit_1d", "SimpleViT")])
def test_vit_pytorch_1d(module, cls, device, fused_calls) -> None:
    model = getattr(_vit_pytorch(module), cls)(seq_len=32, patch_size=4, num_classes=3, dim=16,
                                                depth=1, heads=2, mlp_dim=16)  # fmt: skip
    check_drop_in(model, torch.randn(2, 3, 32), device, fused_calls)


@pytest.mark.parametrize("ndim", [3, 4])
def test_vit_pytorch_nd(ndim, device, fused_calls) -> None:
    """Its stem (the model's attention is FlexAttention, which has no CPU backward)."""
    vit_nd = _vit_pytorch("vit_nd")
    shape, patch = (4, 8, 8, 4)[:ndim], (2, 4, 4, 2)[:ndim]
    model = vit_nd.ViTND(ndim=ndim, input_shape=shape, patch_size=patch, num_classes=3, dim=16,
                         depth=1, heads=2, mlp_dim=16)  # fmt: skip
    check_drop_in(model.to_patch_embedding, torch.randn(2, 3, *shape), device, fused_calls)


# ---------------------------------------------------------------- diffusers


def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is a test extra")


def test_wan_latent_patch_embedding(device, fused_calls) -> None:
    """Wan: a Conv3d with kernel = stride = (1, 2, 2) on latents, inside the transformer."""
    _diffusers()
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                  in_channels=4, out_channels=4, text_dim=8, freq_dim=8,
                                  ffn_dim=16, num_layers=1)  # fmt: skip
    latents = torch.randn(1, 4, 2, 4, 4)
    kw = dict(timestep=torch.tensor([3]), encoder_hidden_states=torch.randn(1, 5, 8),
              return_dict=False)  # fmt: skip

    class Run(nn.Module):  # the model's output is a tuple: compare its first element
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x, **kw)[0]

    _, summary = check_drop_in(Run(), latents, device, fused_calls)
    assert summary.converted[0][0] == "model.patch_embedding"


def test_hunyuan_video_patch_embed(device, fused_calls) -> None:
    _diffusers()
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoPatchEmbed

    embed = HunyuanVideoPatchEmbed(patch_size=(1, 2, 2), in_chans=4, embed_dim=16)
    check_drop_in(embed, torch.randn(2, 4, 3, 4, 6), device, fused_calls)


def test_overlapping_3d_conv_is_left_alone_with_a_reason() -> None:
    """Hiera-style overlapping tubelets: not a patch embedding the fused op computes."""
    _diffusers()
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoPatchEmbed

    embed = HunyuanVideoPatchEmbed(patch_size=(1, 2, 2), in_chans=4, embed_dim=16)
    embed.proj = nn.Conv3d(4, 16, kernel_size=3, stride=2, padding=1)
    summary = fuse_patch_embeddings(embed)
    assert summary.converted == []
    assert "overlapping conv" in dict(summary.skipped)["proj"], str(summary)
    assert type(embed.proj) is nn.Conv3d
