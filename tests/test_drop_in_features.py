"""PyTorch features around converted models: torch.jit.script names zeta_fused instead of failing
deep inside the TorchScript compiler; quantized or replaced projections run eager."""

from __future__ import annotations

import copy

import pytest
import torch
from support import randomise
from torch import nn

from zeta_fused import PatchEmbeddings, fuse_patch_embeddings, fuse_stems


def _timm_vit() -> nn.Module:
    vit = pytest.importorskip("timm.models.vision_transformer")
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                                  num_classes=5, pre_norm=True)  # fmt: skip
    return randomise(model).eval()


@pytest.mark.parametrize("convert", [fuse_stems, fuse_patch_embeddings])
def test_jit_script_of_a_converted_timm_vit_names_zeta_fused(convert, device,
                                                             fused_path_calls) -> None:  # fmt: skip
    """The unconverted model scripts; the converted one raises an error that names zeta_fused
    and what to do, and is left as it was (still converted, still fused)."""
    model = _timm_vit().to(device)
    before = copy.deepcopy(model)
    torch.jit.script(copy.deepcopy(before))
    convert(model, backend="triton")
    with pytest.raises(RuntimeError, match=r"zeta_fused: torch\.jit\.script") as error:
        torch.jit.script(model)
    assert "Script the model before converting it" in str(error.value)
    wrapper = nn.Sequential(model)  # reached inside an unconverted parent: the same error
    with pytest.raises(RuntimeError, match=r"zeta_fused: torch\.jit\.script"):
        torch.jit.script(wrapper)
    assert wrapper[0] is model
    x = torch.randn(2, 3, 32, 32, device=device)
    torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-5)
    assert fused_path_calls == [1]


def test_jit_script_of_zeta_modules_names_zeta_fused() -> None:
    with pytest.raises(RuntimeError, match=r"zeta_fused: torch\.jit\.script"):
        torch.jit.script(PatchEmbeddings(3, 16, patch_size=4))
