"""Tiny models of every converter (zeta_fused.integrations), one per kind of stem or patch
embedding the converters know, for the checks that run over all of them: torch.fx,
torch.compile (fullgraph), torch.export (strict). Each is skipped when its library is missing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from support import randomise
from torch import Tensor, nn

from zeta_fused import fuse_patch_embeddings, fuse_stems

HF_TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               image_size=16, patch_size=8)  # fmt: skip


class Peer(NamedTuple):
    library: str  # imported (or the case skipped) before ``make`` runs
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Tensor, ...]]  # example inputs on the CPU
    convert: Callable = fuse_stems


def _images(channels: int = 3, size: int = 16) -> Callable[[], tuple[Tensor]]:
    return lambda: (torch.randn(2, channels, size, size),)


def _timm_vit(**kw) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1,
                             embed_dim=32, num_heads=2, **kw)  # fmt: skip


def _hf(name: str, **kw) -> nn.Module:
    import transformers

    config = getattr(transformers, f"{name}Config")(**(HF_TINY | kw))
    return getattr(transformers, f"{name}Model")(config)


def _siglip2() -> nn.Module:
    import transformers

    config = transformers.Siglip2VisionConfig(**(HF_TINY | {"patch_size": 4, "num_patches": 16}))
    return transformers.Siglip2VisionModel(config)


def _siglip2_inputs() -> tuple[Tensor, Tensor, Tensor]:
    """Two images of 3x4 and 2x3 patches padded to 12 rows of 3 * 4 * 4 values."""
    shapes = torch.tensor([[3, 4], [2, 3]])
    mask = torch.arange(12) < shapes.prod(-1, keepdim=True)
    return torch.randn(2, 12, 48) * mask[..., None], mask, shapes


def _vit_pytorch(cls: str) -> nn.Module:
    import vit_pytorch

    return getattr(vit_pytorch, cls)(image_size=16, patch_size=8, num_classes=5, dim=32,
                                      depth=1, heads=2, mlp_dim=32, dim_head=16)  # fmt: skip


def _open_clip() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, width=32, layers=1, heads=2,
                             mlp_ratio=2.0, output_dim=16)  # fmt: skip


def _sam() -> nn.Module:
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    return ImageEncoderViT(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                           out_chans=8, window_size=0, global_attn_indexes=())  # fmt: skip


def _diffusers() -> nn.Module:
    from diffusers.models.embeddings import PatchEmbed

    return PatchEmbed(height=16, width=16, patch_size=4, in_channels=4, embed_dim=32,
                      layer_norm=True)  # fmt: skip


PEERS: dict[str, Peer] = {
    # class and register tokens, pre_norm: the norm handed off to the stem (torch's LayerNorm:
    # torch.fx keeps it as a leaf)
    "timm_vit": Peer("timm", lambda: _timm_vit(reg_tokens=1, pre_norm=True,
                                               norm_layer=nn.LayerNorm), _images()),
    "timm_patch_embed": Peer("timm", lambda: _timm_vit(class_token=False, global_pool="avg"),
                             _images(), fuse_patch_embeddings),
    "hf_vit": Peer("transformers", lambda: _hf("ViT"), _images()),
    "hf_deit": Peer("transformers", lambda: _hf("DeiT"), _images()),
    "hf_dinov2_registers": Peer("transformers",
                                lambda: _hf("Dinov2WithRegisters", num_register_tokens=2),
                                _images()),
    "hf_clip": Peer("transformers", lambda: _hf("CLIPVision"), _images()),
    "hf_siglip": Peer("transformers", lambda: _hf("SiglipVision"), _images()),
    "hf_siglip2": Peer("transformers", _siglip2, _siglip2_inputs),
    "hf_aimv2": Peer("transformers", lambda: _hf("Aimv2Vision"), _images()),
    "hf_vit_mae": Peer("transformers", lambda: _hf("ViTMAE", patch_size=4), _images()),
    "hf_video_mae": Peer("transformers", lambda: _hf("VideoMAE", num_frames=4, tubelet_size=2),
                         lambda: (torch.randn(1, 4, 3, 16, 16),)),
    "hf_vit_conv": Peer("transformers", lambda: _hf("ViT"), _images(), fuse_patch_embeddings),
    "vit_pytorch_vit": Peer("vit_pytorch", lambda: _vit_pytorch("ViT"), _images()),
    "vit_pytorch_simple_vit": Peer("vit_pytorch", lambda: _vit_pytorch("SimpleViT"), _images()),
    "open_clip": Peer("open_clip", _open_clip, _images()),
    "segment_anything": Peer("segment_anything", _sam, _images()),
    "diffusers": Peer("diffusers", _diffusers, _images(channels=4)),
}  # fmt: skip


def converted(name: str, backend: str, device: str) -> tuple[nn.Module, nn.Module, tuple]:
    """(the model ``name`` converted with ``backend``, an unconverted copy, example inputs),
    in eval mode on ``device``, with the same perturbed parameters (the same seed for both)."""
    peer = PEERS[name]
    pytest.importorskip(peer.library, reason=f"{peer.library} is a test extra")
    model = randomise(peer.make()).eval().to(device)
    before = copy.deepcopy(model)
    summary = peer.convert(model, backend=backend)
    assert summary.converted, str(summary)
    return model, before, tuple(t.to(device) for t in peer.inputs())


def first_tensor(out) -> Tensor:
    """The model's main output: itself, its first element, or its last_hidden_state."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "last_hidden_state" not in out:
        return next(iter(out.values()))
    return out[0] if isinstance(out, tuple) else out.last_hidden_state
