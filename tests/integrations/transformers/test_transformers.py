"""Whole transformers vision stems converted in place (zeta_fused.integrations.transformers):
ViT, DeiT, DINOv2 (with registers), CLIP (with its pre_layrnorm) and SigLIP embeddings as one
fused call, equal to the peer's own code, which still runs for whatever the op does not do."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from support import check_drop_in, randomise
from torch import nn

from zeta_fused import fuse_stems
from zeta_fused.integrations._base import FusedStem
from zeta_fused.integrations.convert import FusedPatchConv2d

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            image_size=16, patch_size=8)  # fmt: skip
EXTRA = {"Dinov2WithRegisters": {"num_register_tokens": 2}}
NAMES = ["ViT", "DeiT", "Dinov2", "Dinov2WithRegisters", "CLIPVision", "SiglipVision"]
# Converted whole stems: the embeddings (CLIP: its owner's pre_layrnorm hand-off too); the
# summary lists their patch conv after them, converted by fuse_patch_embeddings.
CONVERTED = {"CLIPVision": ["", "embeddings"]}


def conv_name(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is conv_of(model))


# The peers whose forward takes interpolate_pos_encoding (DINOv2 always interpolates).
INTERPOLATES = {"ViT", "DeiT", "CLIPVision", "SiglipVision"}


def hf(name: str, **kw) -> nn.Module:
    config = getattr(transformers, f"{name}Config")(**(TINY | EXTRA.get(name, {}) | kw))
    return getattr(transformers, f"{name}Model")(config)


def conv_of(model: nn.Module) -> nn.Module:
    embeddings = model.embeddings
    patches = embeddings._modules.get("patch_embeddings")
    return embeddings.patch_embedding if patches is None else patches.projection


def hidden(out) -> torch.Tensor:
    return getattr(out, "last_hidden_state", out)


@pytest.fixture
def calls(monkeypatch) -> dict[str, list[int]]:
    """Fused calls made by a whole stem ("stem") and by a fused patch conv ("conv") apart, to
    tell a fused stem from one that fell back to the peer's code (whose conv is fused)."""
    import zeta_fused.functional as functional

    counts: dict[str, list[int]] = {"stem": [], "conv": []}
    real = functional.fused_call
    for key, where in (
        ("stem", "zeta_fused.integrations._base"),
        ("conv", "zeta_fused.integrations.convs"),
    ):
        monkeypatch.setattr(f"{where}.fused_call",
                            lambda *a, seen=counts[key]: seen.append(1) or real(*a))  # fmt: skip
    return counts


def converted(model: nn.Module, device: str) -> tuple[nn.Module, nn.Module]:
    """(the converted model, an unconverted copy), both in eval mode on ``device``."""
    model = randomise(model).eval().to(device)
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    return model, before


@pytest.mark.parametrize("name", NAMES)
def test_stem_drop_in(name, device, fused_path_calls) -> None:
    """Same outputs and parameter gradients in one fused call, same Parameters and keys."""
    model = hf(name)
    keys = list(model.state_dict())
    wanted = CONVERTED.get(name, ["embeddings"])
    model, summary = check_drop_in(model, torch.randn(2, 3, 16, 16), device, fused_path_calls,
                                   expect=len(wanted) + 1, convert=fuse_stems,
                                   expect_calls=1)  # fmt: skip
    assert [n for n, _ in summary.converted] == [*wanted, conv_name(model)], str(summary)
    stems_done = summary.converted[:-1]
    assert all(kind.startswith("whole stem: transformers") for _, kind in stems_done)
    assert summary.skipped == [] and summary.already_fused == []
    assert list(model.state_dict()) == keys
    assert isinstance(model.embeddings, FusedStem) and isinstance(conv_of(model), FusedPatchConv2d)
    again = fuse_stems(model, backend="triton")
    assert again.converted == [] and len(again.already_fused) == len(wanted) + 1


@pytest.mark.parametrize("name", NAMES)
def test_other_image_size_interpolates(name, device, fused_path_calls) -> None:
    """A 24x16 image: the table resampled by the peer's own method, then fused."""
    kw = {"interpolate_pos_encoding": True} if name in INTERPOLATES else {}
    check_drop_in(hf(name), torch.randn(2, 3, 24, 16), device, fused_path_calls,
                  expect=len(CONVERTED.get(name, ["e"])) + 1, convert=fuse_stems, expect_calls=1,
                  **kw)  # fmt: skip


@pytest.mark.parametrize("name", ["ViT", "Dinov2"])
def test_mask_token_falls_back(name, device, calls) -> None:
    model = hf(name, **({"use_mask_token": True} if name == "Dinov2" else {}))
    if name == "ViT":
        model = transformers.ViTModel(model.config, use_mask_token=True)
    model, before = converted(model, device)
    x = torch.randn(2, 3, 16, 16, device=device)
    mask = torch.tensor([[True, False, False, True], [False] * 4], device=device)
    out = model(x, bool_masked_pos=mask).last_hidden_state
    assert calls == {"stem": [], "conv": [1]}  # the peer's forward, its conv fused
    expected = before(x, bool_masked_pos=mask).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_hook_on_skipped_module_and_wrong_size(device, calls) -> None:
    """A hook on the patch conv runs (the peer's forward does); a wrong size raises the
    peer's own error."""
    model, before = converted(hf("ViT"), device)
    x = torch.randn(2, 3, 16, 16, device=device)
    seen = []
    handle = conv_of(model).register_forward_hook(lambda *args: seen.append(1))
    torch.testing.assert_close(model(x).last_hidden_state, before(x).last_hidden_state,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert seen == [1] and calls["stem"] == []
    handle.remove()
    with pytest.raises(ValueError) as peer:
        before(torch.randn(1, 3, 24, 24, device=device))
    with pytest.raises(ValueError) as fused:
        model(torch.randn(1, 3, 24, 24, device=device))
    assert str(fused.value) == str(peer.value)


def test_dropout_as_the_peer(device, calls) -> None:
    """Training mode: the peer's dropout on the fused rows draws the same mask."""
    model, before = converted(hf("ViT", hidden_dropout_prob=0.5), device)
    model.train(), before.train()
    x = torch.randn(2, 3, 16, 16, device=device)
    torch.manual_seed(1)
    out = model.embeddings(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, before.embeddings(x), rtol=1e-4, atol=1e-5)
    assert calls["stem"] == [1]


def test_clip_pre_layrnorm_fused_unless_hooked(device, calls, monkeypatch) -> None:
    """pre_layrnorm is applied by the fused stem (one eager layer norm fewer); with a hook on
    it, the norm runs itself and its hook sees the peer's embeddings."""
    model, before = converted(hf("CLIPVision"), device)
    x = torch.randn(2, 3, 16, 16, device=device)
    norms: list[int] = []
    layer_norm = torch.nn.functional.layer_norm
    monkeypatch.setattr(torch.nn.functional, "layer_norm",
                        lambda *a, **k: norms.append(1) or layer_norm(*a, **k))  # fmt: skip
    expected = before(x).last_hidden_state
    eager_norms = len(norms)
    norms.clear()
    torch.testing.assert_close(model(x).last_hidden_state, expected, rtol=1e-4, atol=1e-5)
    assert len(norms) == eager_norms - 1 and calls["stem"] == [1]
    inputs = []
    model.pre_layrnorm.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    calls["stem"].clear()
    out = model(x).last_hidden_state
    assert len(inputs) == 1 and calls["stem"] == [1]  # the embeddings still fused
    torch.testing.assert_close(inputs[0], before.embeddings(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_clip_embeddings_alone_and_hidden_states(device, calls) -> None:
    """Outside the owner's forward the embeddings are the peer's (no pre_layrnorm); the
    owner's output capture (output_hidden_states) still works on the fused class."""
    model, before = converted(hf("CLIPVision"), device)
    x = torch.randn(2, 3, 16, 16, device=device)
    torch.testing.assert_close(model.embeddings(x), before.embeddings(x), rtol=1e-4, atol=1e-5)
    assert calls["stem"] == [1]
    out, expected = model(x, output_hidden_states=True), before(x, output_hidden_states=True)
    assert len(out.hidden_states) == len(expected.hidden_states) == 2
    for got, want in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_clip_pickle_and_deepcopy(device, calls) -> None:
    model, before = converted(hf("CLIPVision"), device)
    x = torch.randn(2, 3, 16, 16, device=device)
    expected = before(x).last_hidden_state
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model)
        assert type(clone.embeddings) is type(model.embeddings)
        assert type(clone.pre_layrnorm) is type(model.pre_layrnorm)
        calls["stem"].clear()
        torch.testing.assert_close(clone(x).last_hidden_state, expected, rtol=1e-4, atol=1e-5)
        assert calls["stem"] == [1]


def test_unfusable_stems_reported(device) -> None:
    """An overlapping conv and a pre_layrnorm that is no LayerNorm: left alone, with reasons."""
    vit = hf("ViT")
    vit.embeddings.patch_embeddings.projection = nn.Conv2d(3, 16, kernel_size=8, stride=4)
    summary = fuse_stems(vit, backend="triton")
    reasons = dict(summary.skipped)
    assert "overlapping conv" in reasons["embeddings"], str(summary)
    assert type(vit.embeddings) is transformers.models.vit.modeling_vit.ViTEmbeddings
    clip = randomise(hf("CLIPVision")).eval().to(device)
    clip.pre_layrnorm = nn.Identity()
    reference = copy.deepcopy(clip)
    summary = fuse_stems(clip, backend="triton")
    assert "pre_layrnorm: Identity is not a LayerNorm" in dict(summary.skipped)[""], str(summary)
    assert type(clip) is transformers.CLIPVisionModel
    # fused without the norm (and its conv)
    assert [n for n, _ in summary.converted] == ["embeddings", conv_name(clip)]
    x = torch.randn(1, 3, 16, 16, device=device)
    torch.testing.assert_close(clip(x).last_hidden_state, reference(x).last_hidden_state,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("name", ["ViT", "CLIPVision"])
def test_fused_embeddings_compile_fullgraph(name, device, fused_calls) -> None:
    """The fused stems trace without graph breaks (the op is in the compiled graph)."""
    torch._dynamo.reset()
    model, _ = converted(hf(name), device)
    x = torch.randn(2, 3, 16, 16, device=device)
    compiled = torch.compile(model.embeddings, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model.embeddings(x))
    assert len(fused_calls) == 2  # traced into the compiled graph once, run eagerly once


def test_clip_owner_compile_fullgraph(device) -> None:
    """The owner's hand-off scope (per-thread call state) traces too: the whole CLIP vision
    model compiles without graph breaks, with the op in the graph and pre_layrnorm in it."""
    model, before = converted(hf("CLIPVision"), device)
    x = torch.randn(2, 3, 16, 16, device=device)
    graphs = []

    def keep_graph(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    for m in (before, model):
        torch._dynamo.reset()
        out = torch.compile(m, fullgraph=True, backend=keep_graph)(x).last_hidden_state
        torch.testing.assert_close(out, before(x).last_hidden_state, rtol=1e-4, atol=1e-5)
    assert len(graphs) == 2 and "zeta_fused.patch_embed_fwd" in graphs[1]
    norms = [g.count("target=torch.nn.functional.layer_norm]") for g in graphs]
    assert norms[1] == norms[0] - 1, norms


# --- SigLIP2 NaFlex: padded patch rows, a position table resized for each image --------------


def siglip2_inputs(device: str) -> dict[str, torch.Tensor]:
    """Two images of 3x4 and 2x3 patches (K = 3 * 4 * 4) padded to 12 rows, as the NaFlex
    processor hands them over: the second has 6 padding rows, which the peer embeds too."""
    shapes = torch.tensor([[3, 4], [2, 3]], device=device)
    mask = torch.arange(12, device=device) < shapes.prod(-1, keepdim=True)
    rows = torch.randn(2, 12, 48, device=device) * mask[..., None]
    return {"pixel_values": rows, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def siglip2() -> nn.Module:
    config = transformers.Siglip2VisionConfig(**(TINY | {"patch_size": 4, "num_patches": 16}))
    return transformers.Siglip2VisionModel(config)


def test_siglip2_naflex_drop_in(device, fused_path_calls) -> None:
    """One fused call over every row (padding rows included, as the peer returns them), the
    same outputs and gradients, the position table's through the peer's resizing."""
    inputs = siglip2_inputs(device)
    model, summary = check_drop_in(siglip2(), inputs.pop("pixel_values"), device,
                                   fused_path_calls, convert=fuse_stems, **inputs)  # fmt: skip
    assert [(n, k) for n, k in summary.converted] == [
        ("embeddings", "whole stem: transformers Siglip2VisionEmbeddings")
    ]
    assert model.embeddings.position_embedding.weight.grad.abs().sum() > 0


def test_siglip2_embeddings_padding_rows_and_fallbacks(device, fused_path_calls) -> None:
    model, before = converted(siglip2(), device)
    x, shapes = siglip2_inputs(device)["pixel_values"], siglip2_inputs(device)["spatial_shapes"]
    with torch.no_grad():
        torch.testing.assert_close(model.embeddings(x, shapes), before.embeddings(x, shapes))
        assert len(fused_path_calls) == 1
        # A hook on the Linear the fused call skips: the peer's forward runs it.
        seen = []
        handle = model.embeddings.patch_embedding.register_forward_hook(lambda *a: seen.append(1))
        torch.testing.assert_close(model.embeddings(x, shapes), before.embeddings(x, shapes))
        assert seen == [1] and len(fused_path_calls) == 1
        handle.remove()
        # Rows of another width: the peer's own error.
        with pytest.raises(RuntimeError) as fused_error:
            model.embeddings(x[..., :40], shapes)
        with pytest.raises(RuntimeError) as peer_error:
            before.embeddings(x[..., :40], shapes)
        assert str(fused_error.value) == str(peer_error.value)


def test_siglip2_under_autocast_gives_the_peers_dtype(device, fused_path_calls) -> None:
    """bf16 Linear + fp32 resized table: the peer's sum is fp32, and so is the fused one."""
    model, before = converted(siglip2(), device)
    x, shapes = siglip2_inputs(device)["pixel_values"], siglip2_inputs(device)["spatial_shapes"]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        got, want = model.embeddings(x, shapes), before.embeddings(x, shapes)
    assert got.dtype == want.dtype == torch.float32 and len(fused_path_calls) == 1
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
