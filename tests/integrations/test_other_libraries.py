"""fuse_stems on the whole stems of vit-pytorch, OpenCLIP, Segment Anything and diffusers
(zeta_fused.integrations): tiny real models, fused vs unconverted."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from support import check_drop_in, randomise, same_outcome
from torch import nn

from zeta_fused import fuse_stems
from zeta_fused.integrations._base import FusedStem
from zeta_fused.nn.patch_embed import FusedPatchSequential

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _vit(**kw):
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    args = dict(image_size=16, patch_size=8, num_classes=5, dim=32, depth=1, heads=2,
                mlp_dim=32, dim_head=16)  # fmt: skip
    return vit_pytorch.ViT(**(args | kw))


def _open_clip_vit(**kw):
    transformer = pytest.importorskip("open_clip.transformer", reason="open_clip is a test extra")
    args = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                output_dim=16)  # fmt: skip
    return transformer.VisionTransformer(**(args | kw))


def _diffusers_patch_embed(**kw):
    embeddings = pytest.importorskip("diffusers.models.embeddings", reason="a test extra")
    args = dict(height=16, width=16, patch_size=4, in_channels=4, embed_dim=32)
    return embeddings.PatchEmbed(**(args | kw))


def _converted(summary, kind: str) -> list[str]:
    return [name for name, what in summary.converted if what == f"whole stem: {kind}"]


def _same_output(model, before, x, calls, expect_calls=1, **kw) -> torch.Tensor:
    """The converted model's output equals the unconverted copy's, with ``expect_calls``
    fused calls."""
    calls.clear()
    out = model(x, **kw)
    assert len(calls) == expect_calls
    torch.testing.assert_close(out, before(x, **kw), **TOL)
    return out


# ---------------------------------------------------------------- vit-pytorch


def test_vit_pytorch_vit(device, fused_path_calls) -> None:
    """The stem and to_patch_embedding converted, one fused call, outputs and every gradient
    (class token and position table included) as before."""
    model = _vit()
    keys = set(model.state_dict())
    model, summary = check_drop_in(model, torch.randn(2, 3, 16, 16), device, fused_path_calls,
                                   expect=2, convert=fuse_stems, expect_calls=1)  # fmt: skip
    assert _converted(summary, "vit-pytorch ViT") == [""]
    assert isinstance(model, FusedStem)
    assert isinstance(model.to_patch_embedding, FusedPatchSequential)
    assert set(model.state_dict()) == keys
    assert model.cls_token.grad is not None and model.pos_embedding.grad is not None


def test_vit_pytorch_vit_training_mean_pool_and_larger_table(device, fused_path_calls) -> None:
    """Training mode (dropout p=0), mean pooling (no class token), a table with rows to spare:
    the same outputs and gradients (the empty (0, D) class token's too: an empty one)."""
    model = randomise(_vit(pool="mean", image_size=(16, 24))).to(device).train()
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    x = torch.randn(2, 3, 16, 16, device=device)  # 4 of the table's 6 rows
    out = _same_output(model, before, x, fused_path_calls)
    out.square().sum().backward()
    before(x).square().sum().backward()
    for p, p_ref in zip(model.parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL)


def test_vit_pytorch_vit_hook_falls_back_and_deepcopy(device, fused_path_calls) -> None:
    model = randomise(_vit()).to(device).eval()
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    x = torch.randn(2, 3, 16, 16, device=device)
    seen = []
    handle = model.to_patch_embedding[2].register_forward_hook(lambda *a: seen.append(1))
    _same_output(model, before, x, fused_path_calls, expect_calls=0)
    assert seen == [1]
    handle.remove()
    _same_output(model, before, x, fused_path_calls)
    copied = copy.deepcopy(model)  # pickled as the peer's class, converted again
    assert type(copied) is type(model) and copied.zeta_backend == "triton"
    _same_output(copied, before, x, fused_path_calls)
    with pytest.raises(RuntimeError):  # an image larger than the table: the peer's own error
        model(torch.randn(1, 3, 16, 32, device=device))


def test_vit_pytorch_simple_vit_non_square(device, fused_path_calls) -> None:
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    model = vit_pytorch.SimpleViT(image_size=(16, 24), patch_size=8, num_classes=5, dim=32,
                                  depth=1, heads=2, mlp_dim=32, dim_head=16)  # fmt: skip
    _, summary = check_drop_in(model, torch.randn(2, 3, 16, 24), device, fused_path_calls,
                               expect=2, convert=fuse_stems, expect_calls=1)  # fmt: skip
    assert _converted(summary, "vit-pytorch SimpleViT") == [""]


def test_vit_pytorch_reasons() -> None:
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")

    class Custom(vit_pytorch.ViT):
        def forward(self, img):
            return super().forward(img) * 2

    summary = fuse_stems(Custom(image_size=16, patch_size=8, num_classes=5, dim=32, depth=1,
                                heads=2, mlp_dim=32), backend="triton")  # fmt: skip
    assert ("", "whole stem: vit-pytorch ViT: Custom overrides ViT.forward") in summary.skipped
    other = _vit()
    other.to_patch_embedding[1] = nn.BatchNorm1d(192)
    summary = fuse_stems(other, backend="triton")
    (why,) = [w for n, w in summary.skipped if n == ""]
    assert why.startswith("whole stem: vit-pytorch ViT: to_patch_embedding: ")


# ---------------------------------------------------------------- OpenCLIP


def test_open_clip_vision_transformer(device, fused_path_calls) -> None:
    """conv1, class and position embeddings and ln_pre in one call; all gradients as before."""
    model = _open_clip_vit()
    keys = set(model.state_dict())
    model, summary = check_drop_in(model, torch.randn(2, 3, 16, 16), device, fused_path_calls,
                                   convert=fuse_stems, expect_calls=1)  # fmt: skip
    assert _converted(summary, "OpenCLIP VisionTransformer") == [""]
    assert set(model.state_dict()) == keys
    assert model.class_embedding.grad is not None and model.ln_pre.weight.grad is not None


def test_open_clip_patch_dropout_and_pickle(device, fused_path_calls) -> None:
    """Patch dropout active: the stem draws the same random patches and embeds those
    (tests/integrations/test_token_drop.py); in eval ln_pre is fused. A pickle round trip stays
    fused; a hook on ln_pre has it run after the fused stem, a hook on conv1 runs the peer's
    code."""
    model = randomise(_open_clip_vit(patch_dropout=0.5, output_tokens=True)).to(device).train()
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    x = torch.randn(2, 3, 16, 16, device=device)
    torch.manual_seed(1)
    pooled, tokens = model(x)
    assert len(fused_path_calls) == 1
    torch.manual_seed(1)
    pooled_ref, tokens_ref = before(x)
    torch.testing.assert_close(tokens, tokens_ref, **TOL)
    torch.testing.assert_close(pooled, pooled_ref, **TOL)
    loaded = pickle.loads(pickle.dumps(model)).eval()
    assert type(loaded) is type(model)
    _same_output(loaded, before.eval(), x, fused_path_calls)
    seen = []
    loaded.ln_pre.register_forward_pre_hook(lambda *a: seen.append("ln_pre"))
    _same_output(loaded, before, x, fused_path_calls)  # ln_pre called on the fused tokens
    loaded.conv1.register_forward_hook(lambda *a: seen.append("conv1"))
    _same_output(loaded, before, x, fused_path_calls, expect_calls=0)  # the peer's _embeds
    assert seen == ["ln_pre", "conv1", "ln_pre"]


def test_open_clip_empty_batch_as_the_peer(device, fused_path_calls) -> None:
    """An empty batch runs OpenCLIP's own code (it raises for one)."""
    model = randomise(_open_clip_vit()).eval().to(device)
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    same_outcome(model, before, torch.randn(0, 3, 16, 16, device=device))
    assert fused_path_calls == []


# ---------------------------------------------------------------- Segment Anything


@pytest.mark.parametrize("abs_pos", [True, False], ids=["pos_embed", "no_pos_embed"])
def test_sam_image_encoder(device, fused_path_calls, abs_pos) -> None:
    encoder = pytest.importorskip(
        "segment_anything.modeling.image_encoder", reason="segment-anything is a test extra"
    )
    model = encoder.ImageEncoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                    num_heads=2, out_chans=16, use_abs_pos=abs_pos)  # fmt: skip
    _, summary = check_drop_in(model, torch.randn(2, 3, 32, 32), device, fused_path_calls,
                               convert=fuse_stems, expect_calls=1)  # fmt: skip
    assert _converted(summary, "Segment Anything ImageEncoderViT") == [""]


# ---------------------------------------------------------------- diffusers

DIFFUSERS_CASES = {
    "dit": (dict(), (16, 16)),
    "pixart_other_size_layer_norm": (dict(layer_norm=True, interpolation_scale=2), (12, 20)),
    "sd3_crop_non_square": (dict(pos_embed_max_size=8), (16, 24)),
    "no_pos_embed": (dict(pos_embed_type=None, layer_norm=True), (8, 12)),
}


@pytest.mark.parametrize("case", DIFFUSERS_CASES)
def test_diffusers_patch_embed(device, fused_path_calls, case) -> None:
    """DiT, PixArt (another latent size: the table computed again), SD3 (the centre crop),
    no table: one fused call."""
    kw, (height, width) = DIFFUSERS_CASES[case]
    model = _diffusers_patch_embed(**kw)
    # The stem and its conv (fuse_patch_embeddings converts diffusers' patch convs too).
    _, summary = check_drop_in(model, torch.randn(2, 4, height, width), device,
                               fused_path_calls, expect=2, convert=fuse_stems,
                               expect_calls=1)  # fmt: skip
    assert _converted(summary, "diffusers PatchEmbed") == [""]


def test_diffusers_table_made_under_inference_mode_then_trained(device, fused_path_calls) -> None:
    """PixArt at another latent size: the sincos table computed for a call under
    inference_mode, then a training step: the peer's gradients (no inference tensor reaches
    autograd), and tables on the device and in the dtype of each call."""
    model = randomise(_diffusers_patch_embed(layer_norm=True, interpolation_scale=2)).to(device)
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    x = torch.randn(2, 4, 12, 20, device=device)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before(x), **TOL)
    model(x).square().sum().backward()
    before(x).square().sum().backward()
    for p, p_ref in zip(model.parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL)
    model.double(), before.double()
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), before(x.double()), **TOL)
    assert len(fused_path_calls) == 3


def test_diffusers_sd3_transformer(device, fused_path_calls) -> None:
    """A whole (tiny) SD3 transformer, a non-square latent: its PatchEmbed fused in place."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra")
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
    )  # fmt: skip
    model = randomise(model).to(device).eval()
    before = copy.deepcopy(model)
    summary = fuse_stems(model, backend="triton")
    assert _converted(summary, "diffusers PatchEmbed") == ["pos_embed"]
    kw = dict(
        hidden_states=torch.randn(2, 4, 8, 12, device=device),
        encoder_hidden_states=torch.randn(2, 3, 16, device=device),
        pooled_projections=torch.randn(2, 16, device=device),
        timestep=torch.tensor([1, 2], device=device),
        return_dict=False,
    )
    with torch.no_grad():
        (out,), (out_ref,) = model(**kw), before(**kw)
    assert len(fused_path_calls) == 1
    torch.testing.assert_close(out, out_ref, **TOL)


def test_diffusers_reasons_and_errors(device, fused_path_calls) -> None:
    unflat = _diffusers_patch_embed(flatten=False)
    summary = fuse_stems(unflat, backend="triton")
    assert any("flatten=False" in why for _, why in summary.skipped), str(summary)
    model = _diffusers_patch_embed(pos_embed_max_size=4).to(device)
    fuse_stems(model, backend="triton")
    with pytest.raises(ValueError, match="pos_embed_max_size"):  # the peer's own error
        model(torch.randn(1, 4, 24, 16, device=device))
