"""Masked-pretraining stems of transformers converted in place
(zeta_fused.integrations.transformers_masked): ViTMAE and VideoMAE embed only the patches they
keep, in one fused call: the peer's outputs (ViTMAE's mask and ids_restore too), gradients and
random-number consumption for the same seed, no full-length token tensor, the peer's code for
what the op does not do."""

from __future__ import annotations

import copy

import pytest
import torch
from support import no_full_length_tokens, randomise, same_random_run
from torch import nn

from zeta_fused import fuse_stems
from zeta_fused.integrations._base import FusedStem

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
DECODER = dict(decoder_hidden_size=8, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
               decoder_intermediate_size=8)  # fmt: skip


def converted(model: nn.Module, device: str) -> tuple[nn.Module, nn.Module]:
    """(the converted model, an unconverted copy) on ``device``; the summary checked."""
    model = randomise(model).to(device)
    before = copy.deepcopy(model)
    summary = fuse_stems(model, backend="triton")
    stem = next(m for m in model.modules() if isinstance(m, FusedStem))
    name = type(stem).__name__
    assert [kind for _, kind in summary.converted][0] == f"whole stem: transformers {name}"
    assert not summary.skipped and not summary.already_fused, str(summary)
    return model, before


# ---------------------------------------------------------------- ViTMAE


def vit_mae(cls: str = "ViTMAEModel", **kw) -> nn.Module:
    config = transformers.ViTMAEConfig(image_size=16, patch_size=4, **(TINY | DECODER | kw))
    return getattr(transformers, cls)(config)


def mae_outputs(out) -> list[torch.Tensor]:
    """The encoder's tokens (or the pretraining model's logits), the mask and ids_restore."""
    first = out.logits if "logits" in out else out.last_hidden_state
    return [first, out.mask, out.ids_restore]


@pytest.mark.parametrize("cls", ["ViTMAEModel", "ViTMAEForPreTraining"])
def test_vit_mae_masks_as_the_peer(cls, device, fused_path_calls) -> None:
    """The same random mask for the same seed (training as eval: ViTMAE always masks)."""
    model, before = converted(vit_mae(cls), device)
    x = torch.randn(2, 3, 16, 16, device=device)
    out = same_random_run(model, before, x, fused_path_calls, parts=mae_outputs)
    assert out[1].sum(1).tolist() == [12, 12]  # mask_ratio 0.75 of 16 patches
    model.eval(), before.eval()
    torch.manual_seed(3)
    expected = mae_outputs(before(x))
    torch.manual_seed(3)
    for got, want in zip(mae_outputs(model(x)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_vit_mae_builds_only_kept_tokens(device) -> None:
    model, before = converted(vit_mae(), device)
    x = torch.randn(2, 3, 16, 16, device=device)
    seen = no_full_length_tokens(model, x, "forward", 16, 16, 1)
    assert (2, 1 + 4, 16) in seen
    with pytest.raises(AssertionError, match="full-length"):
        no_full_length_tokens(before, x, "forward", 16, 16, 1)


def test_vit_mae_noise_and_interpolation(device, fused_path_calls) -> None:
    """Given noise decides the mask (no random numbers drawn); another image size resamples
    the table with the peer's interpolate_pos_encoding."""
    model, before = converted(vit_mae(), device)
    x = torch.randn(2, 3, 24, 16, device=device)
    noise = torch.rand(2, 24, device=device)
    out = same_random_run(model, before, x, fused_path_calls, parts=mae_outputs, noise=noise,
                          interpolate_pos_encoding=True)  # fmt: skip
    torch.testing.assert_close(out[2], noise.argsort(1).argsort(1))


@pytest.mark.parametrize("case", ["wrong_noise_shape", "wrong_size", "hook", "op_declines"])
def test_vit_mae_runs_the_peer(case, device, fused_path_calls, monkeypatch) -> None:
    """Noise of another shape, an image of another size, a hook on the patch conv, or the op
    declining after the draw (a wrapper operand): the peer's forward with the same noise."""
    import zeta_fused.integrations._base as base

    model, before = converted(vit_mae(), device)
    size, kw = (16, 16), {}
    if case == "wrong_noise_shape":
        kw["noise"] = torch.rand(1, 16, device=device)  # the peer then embeds one image
    elif case == "wrong_size":
        size = (24, 16)
    elif case == "hook":
        seen = []
        projection = model.embeddings.patch_embeddings.projection
        projection.register_forward_hook(lambda *a: seen.append(1))
    else:
        monkeypatch.setattr(base, "fused_call", lambda *args: None)
    x = torch.randn(2, 3, *size, device=device)
    if case == "wrong_size":
        with pytest.raises(ValueError, match="doesn't match model") as peer:
            before(x)
        with pytest.raises(ValueError) as fused:
            model(x)
        assert str(fused.value) == str(peer.value)
        return
    # The peer's forward: its patch conv (converted, its hook running) is the one fused call.
    same_random_run(model, before, x, fused_path_calls, parts=mae_outputs, **kw)
    assert case != "hook" or seen == [1]


def test_vit_mae_keeping_no_patch(device, fused_path_calls) -> None:
    """A mask ratio that keeps no patch: the class row alone, as the peer gives it."""
    model, before = converted(vit_mae(mask_ratio=0.99), device)
    out = same_random_run(model, before, torch.randn(2, 3, 16, 16, device=device),
                          fused_path_calls, parts=mae_outputs)  # fmt: skip
    assert out[0].shape == (2, 1, 16)


def test_vit_mae_own_masking_is_reported() -> None:
    from transformers.models.vit_mae import modeling_vit_mae as peer

    class OwnMasking(peer.ViTMAEEmbeddings):
        def random_masking(self, sequence, noise=None):
            return super().random_masking(sequence * 2, noise)

    model = vit_mae()
    model.embeddings.__class__ = OwnMasking
    summary = fuse_stems(model)
    assert ("embeddings", "whole stem: transformers ViTMAEEmbeddings: OwnMasking overrides "
            "ViTMAEEmbeddings.random_masking") in summary.skipped, str(summary)  # fmt: skip


# ---------------------------------------------------------------- VideoMAE

VIDEO = (2, 4, 3, 16, 16)  # (B, T, C, H, W): 2 x 4 x 4 tubelets of 2 x 4 x 4


def video_mae(cls: str = "VideoMAEModel") -> nn.Module:
    config = transformers.VideoMAEConfig(image_size=16, patch_size=4, num_frames=4,
                                         tubelet_size=2, **(TINY | DECODER))  # fmt: skip
    return getattr(transformers, cls)(config)


def random_mask(batch: int, masked: int, tokens: int = 32) -> torch.Tensor:
    """VideoMAE's masks: ``masked`` random tubelets of each video."""
    rows = [torch.randperm(tokens)[:masked] for _ in range(batch)]
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[torch.arange(batch)[:, None], torch.stack(rows)] = True
    return mask


@pytest.mark.parametrize("cls", ["VideoMAEModel", "VideoMAEForPreTraining"])
def test_video_mae_keeps_the_visible_tubelets(cls, device, fused_path_calls) -> None:
    model, before = converted(video_mae(cls), device)
    mask = random_mask(2, 24).to(device)
    parts = (lambda out: [out.loss, out.logits]) if "Pre" in cls else None
    same_random_run(model, before, torch.randn(*VIDEO, device=device), fused_path_calls,
                    parts=parts, bool_masked_pos=mask)  # fmt: skip


def test_video_mae_builds_only_visible_tokens(device) -> None:
    model, before = converted(video_mae(), device)
    x, mask = torch.randn(*VIDEO, device=device), random_mask(2, 24).to(device)
    assert (2, 8, 16) in no_full_length_tokens(model, x, "forward", 32, 16, 0, bool_masked_pos=mask)
    with pytest.raises(AssertionError, match="full-length"):
        no_full_length_tokens(before, x, "forward", 32, 16, 0, bool_masked_pos=mask)


def test_video_mae_without_mask_is_one_fused_stem(device, fused_path_calls) -> None:
    model, before = converted(video_mae(), device)
    same_random_run(model, before, torch.randn(*VIDEO, device=device), fused_path_calls)


@pytest.mark.parametrize("visible", [(8, 9), (7, 9)], ids=["peer_raises", "peer_mixes_videos"])
def test_video_mae_counts_differing_between_videos(visible, device, fused_path_calls,
                                                   monkeypatch) -> None:  # fmt: skip
    """The peer's reshape raises when the total is not a multiple of the batch, and mixes the
    videos' tokens when it is; the converted model raises naming the counts, before any
    patch is embedded."""
    model, before = converted(video_mae(), device)
    x = torch.randn(*VIDEO, device=device)
    mask = torch.stack([random_mask(1, 32 - n)[0] for n in visible]).to(device)
    if sum(visible) % 2:
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            before(x, bool_masked_pos=mask)
    convs = []
    conv3d = torch.nn.functional.conv3d
    monkeypatch.setattr(torch.nn.functional, "conv3d",
                        lambda *a, **k: convs.append(1) or conv3d(*a, **k))  # fmt: skip
    with pytest.raises(RuntimeError, match=rf"leaves \[{visible[0]}, {visible[1]}\] patches"):
        model(x, bool_masked_pos=mask)
    assert fused_path_calls == [] and convs == []


@pytest.mark.filterwarnings("ignore:indexing with dtype torch.uint8")
@pytest.mark.parametrize("case", ["all_masked", "byte_mask", "hook", "wrong_frames"])
def test_video_mae_runs_the_peer(case, device, fused_path_calls) -> None:
    """Every tubelet masked, a mask of another dtype, a hook on the patch module, or a video
    of another length (the table does not fit): the peer's forward, its outcome."""
    model, before = converted(video_mae(), device)
    x = torch.randn(2, 2 if case == "wrong_frames" else 4, 3, 16, 16, device=device)
    mask = random_mask(2, 32 if case == "all_masked" else 16).to(device)
    if case == "byte_mask":
        mask = mask.to(torch.uint8)  # the peer's ~ and indexing treat it as integers
    if case == "hook":
        for m in (model, before):
            m.embeddings.patch_embeddings.register_forward_hook(lambda *a: None)
    outcomes = []
    for m in (before, model):
        try:
            outcomes.append(m(x, bool_masked_pos=mask).last_hidden_state)
        except Exception as exc:  # noqa: BLE001 - compared below
            outcomes.append(f"{type(exc).__name__}: {exc}")
    if isinstance(outcomes[0], str):
        assert outcomes[1] == outcomes[0]
    else:
        torch.testing.assert_close(outcomes[1], outcomes[0], rtol=1e-4, atol=1e-5)
