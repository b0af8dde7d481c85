"""Norms as values: RMSNorm (torch's and the peers' own classes) before and after the projection
and over every row of a whole stem, and an epsilon per norm, through the modules and the
conversions, fused against the unconverted modules (the op itself: tests/op/test_stem_op.py)."""

from __future__ import annotations

import pytest
import torch
from einops.layers.torch import Rearrange
from support import check_drop_in, compare, randomise
from torch import nn

from zeta_fused import FusedPatchSequential, Norm, PatchEmbeddings, ViTStem, fuse_stems, patch_embed
from zeta_fused.kernels.contract import LAYER_NORM, RMS_NORM
from zeta_fused.nn.norms import norm_kind, norm_problem, norm_value
from zeta_fused.op.reference import PATCHIFY


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patch_embeddings_with_rms_norms(dtype, device) -> None:
    m = randomise(PatchEmbeddings(3, 40, patch_size=4, norm_layer=nn.RMSNorm), 0.2).double()
    compare(m, torch.randn(2, 3, 8, 12), dtype, device)


def test_vit_stem_with_rms_norms(device, fused_path_calls) -> None:
    m = ViTStem(3, 300, 8, 4, num_prefix_tokens=2, pre_norm=True, post_norm=True,
                stem_norm=True, norm_layer=nn.RMSNorm)  # fmt: skip
    compare(randomise(m, 0.2).double(), torch.randn(2, 3, 8, 8), torch.float32, device)
    assert fused_path_calls


def sequential(norm1: nn.Module, norm2: nn.Module, dim: int = 40) -> FusedPatchSequential:
    return FusedPatchSequential(Rearrange(PATCHIFY, p1=4, p2=4), norm1, nn.Linear(48, dim), norm2)


def test_each_norm_keeps_its_eps(device, fused_path_calls) -> None:
    """LayerNorms with different epsilons (1e-5 on the patch, 1e-6 on the token; eps that
    large matter in the output) fuse, each with its own."""
    m = sequential(nn.LayerNorm(48, eps=1e-5), nn.LayerNorm(40, eps=1e-2))
    assert m.why_not_fused is None
    compare(randomise(m, 0.2).double(), torch.randn(2, 3, 8, 8), torch.float32, device)
    assert fused_path_calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_default_eps_is_its_accumulation_types(dtype, device, fused_path_calls) -> None:
    """nn.RMSNorm(eps=None) uses the machine epsilon of the type rms_norm accumulates in:
    fp32's for bf16, fp16 and fp32 inputs, fp64's for fp64 ones (not bf16's 7.8e-3, which
    shrinks the tokens of small patches)."""
    m = sequential(nn.RMSNorm(48), nn.RMSNorm(40))
    assert norm_value(m[1], dtype).eps == torch.finfo(torch.float32).eps
    assert norm_value(m[1], torch.float64).eps == torch.finfo(torch.float64).eps
    # Pixels of 1e-2: mean(t^2) = 1e-4, where an eps of 7.8e-3 would dominate.
    compare(randomise(m, 0.2).double(), 1e-2 * torch.randn(2, 3, 8, 8), dtype, device)
    assert fused_path_calls


def test_functional_rms_norm_with_default_eps(device) -> None:
    """Functional Norms with eps=None (an RMSNorm's own) run fused, each with the eps the eager
    path (F.rms_norm) uses."""
    x = 1e-2 * torch.randn(2, 3, 8, 8, device=device, dtype=torch.bfloat16)
    w = torch.randn(40, 48, device=device, dtype=torch.bfloat16)
    g1 = torch.randn(48, device=device, dtype=torch.bfloat16)
    default = Norm(RMS_NORM, None, None, None)
    norms = dict(pre_norm=Norm(RMS_NORM, g1, None, None), post_norm=default, stem_norm=default)
    ys = [patch_embed(x, 4, w, **norms, backend=b) for b in ("eager", "triton")]
    torch.testing.assert_close(ys[1], ys[0], rtol=2e-2, atol=2e-2)


def test_mixed_kinds_in_a_sequential(device) -> None:
    m = sequential(nn.RMSNorm(48, eps=1e-4), nn.LayerNorm(40, bias=False))
    compare(randomise(m, 0.2).double(), torch.randn(2, 3, 8, 8), torch.float32, device)


class ScaledRMSNorm(nn.RMSNorm):
    def forward(self, x):
        return 2 * super().forward(x)


def test_norms_the_op_does_not_compute_run_eager(device, fused_path_calls) -> None:
    m = sequential(ScaledRMSNorm(48), nn.Identity())
    assert norm_kind(m[1]) is None and "ScaledRMSNorm" in m.why_not_fused
    x = torch.randn(2, 3, 8, 8, device=device)
    m.to(device).backend = "triton"
    torch.testing.assert_close(m(x), nn.Sequential(*m)(x))
    assert not fused_path_calls
    wide = sequential(nn.RMSNorm(48), nn.Identity())
    wide[1].normalized_shape = (96,)  # changed in place: checked per call
    assert "over (96,)" in norm_problem(wide[1], 48)


def test_peer_norm_classes_are_recognised() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    assert norm_kind(timm_layers.LayerNorm(8)) == LAYER_NORM
    assert norm_kind(timm_layers.RmsNorm(8)) == RMS_NORM
    aimv2 = pytest.importorskip("transformers.models.aimv2.modeling_aimv2")
    hf_norm = aimv2.Aimv2RMSNorm(8, eps=1e-6)
    assert norm_kind(hf_norm) == RMS_NORM and norm_problem(hf_norm, 8) is None
    value = norm_value(hf_norm, torch.float32)
    assert value.kind == RMS_NORM and value.bias is None and value.eps == 1e-6


def test_timm_patch_embed_with_rms_norm(device, fused_path_calls) -> None:
    timm_layers = pytest.importorskip("timm.layers")
    model = timm_layers.PatchEmbed(16, 4, 3, 40, norm_layer=timm_layers.RmsNorm)
    check_drop_in(model, torch.randn(2, 3, 16, 16), device, fused_path_calls)


def aimv2_vision(native: bool = False):
    transformers = pytest.importorskip("transformers")
    config = transformers.Aimv2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=4, is_native=native,
    )  # fmt: skip
    return transformers.Aimv2VisionModel(config).eval()


def test_aimv2_vision_stem(device, fused_path_calls) -> None:
    """AIMv2's embeddings (conv -> RMSNorm -> + position table) as one fused call."""
    # Converted: the embeddings, and their patch conv (for the calls that fall back).
    model, summary = check_drop_in(aimv2_vision(), torch.randn(2, 3, 16, 16), device,
                                   fused_path_calls, expect=2, expect_calls=1,
                                   convert=fuse_stems)  # fmt: skip
    assert any("Aimv2VisionEmbeddings" in kind for _, kind in summary.converted), str(summary)


def test_aimv2_native_resolution_runs_the_peer(device, fused_path_calls) -> None:
    model = randomise(aimv2_vision(native=True)).to(device)
    x = torch.randn(2, 3, 16, 24, device=device)
    expected = model(x).last_hidden_state
    fuse_stems(model, backend="triton")
    torch.testing.assert_close(model(x).last_hidden_state, expected)
    assert len(fused_path_calls) == 1  # the peer's forward, with its patch conv fused


def test_t5_style_rms_norms_under_autocast_run_eager(fused_path_calls) -> None:
    """transformers' T5-style RMSNorms multiply by their weight after rounding: under autocast
    an fp32 weight makes the output fp32, which the op's dtype rule does not give; such calls
    run eager (torch's own nn.RMSNorm follows the rule and stays fused)."""
    pixtral = pytest.importorskip("transformers.models.pixtral.modeling_pixtral")
    x = torch.randn(2, 3, 8, 8)
    for norm, fused in ((pixtral.PixtralRMSNorm, False), (nn.RMSNorm, True)):
        m = randomise(sequential(norm(48), norm(40)))
        m.backend = "triton"
        fused_path_calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = m(x), nn.Sequential(*m)(x)
        assert got.dtype == want.dtype, norm
        assert bool(fused_path_calls) == fused, norm
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
