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


def test_quantize_dynamic_runs_eager_on_the_fused_backend(fused_path_calls) -> None:
    """quantize_dynamic swaps the projection for a dynamic quantized Linear (also named
    "Linear", its weight a method): the Sequential runs itself and says why."""
    m = randomise(PatchEmbeddings(3, 16, patch_size=4, backend="triton"))
    q = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(q(x), nn.Sequential(*q.embedding)(x))
    assert "'torch.ao.nn.quantized.dynamic.modules.linear.Linear'" in q.embedding.why_not_fused
    assert fused_path_calls == []


def test_quantize_dynamic_on_a_converted_vit_pytorch_stem(fused_path_calls) -> None:
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    args = dict(image_size=16, patch_size=8, num_classes=5, dim=32, depth=1, heads=2,
                mlp_dim=32, dim_head=16)  # fmt: skip
    model = randomise(vit_pytorch.ViT(**args)).eval()
    fuse_stems(model, backend="triton")
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 3, 16, 16)
    out = q(x)
    assert fused_path_calls == []
    for m in q.modules():  # the same model, run by its own classes
        if hasattr(m, "zeta_backend"):
            m.zeta_backend = "eager"
    torch.testing.assert_close(out, q(x))


def _two_tensor(t: torch.Tensor) -> nn.Parameter:
    """A traceable wrapper subclass (as DTensor and torchao's quantized weights are) holding
    two tensors: each op runs on both."""
    from torch.testing._internal.two_tensor import TwoTensor

    return nn.Parameter(TwoTensor(t.detach(), 2 * t.detach()))


@pytest.mark.parametrize("grad", [False, True])
def test_wrapper_subclass_weight_runs_eager(grad, device, fused_path_calls) -> None:
    """A weight that is a wrapper tensor subclass has no buffer the kernels can read: the call
    runs the module's own code, which the subclass implements. (On the device the fused backend
    takes: a CPU call with backend="triton" raises on a CUDA machine before anything else.)"""
    m = randomise(PatchEmbeddings(3, 16, patch_size=4, backend="triton", device=device))
    proj = m.embedding[2]
    proj.weight = _two_tensor(proj.weight)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.set_grad_enabled(grad):
        out, expected = m(x), nn.Sequential(*m.embedding)(x)
    torch.testing.assert_close((out.a, out.b), (expected.a, expected.b))
    assert fused_path_calls == []


def test_wrapper_subclass_weight_in_a_timm_stem_runs_timm(device, fused_path_calls) -> None:
    model = _timm_vit().to(device)
    model.patch_embed.proj.weight = _two_tensor(model.patch_embed.proj.weight)
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        out, expected = model(x), before(x)
    torch.testing.assert_close((out.a, out.b), (expected.a, expected.b), rtol=1e-4, atol=1e-5)
    assert fused_path_calls == []
