"""Whole timm ViT stems converted in place (zeta_fused.integrations.timm): patch embedding, prefix
tokens, position table and norm_pre in one fused call, equal to timm's own stem."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from support import check_drop_in, randomise, same_outcome
from torch import nn

from zeta_fused import fuse_stems

timm = pytest.importorskip("timm")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

CONFIGS = {
    "cls": {},
    "cls+reg": {"reg_tokens": 2},
    "no_embed_class+reg": {"no_embed_class": True, "reg_tokens": 2},
    "dinov2_reg4": {
        "no_embed_class": True,
        "reg_tokens": 4,
        "patch_size": 4,
        "img_size": 28,
        "init_values": 1e-5,
    },  # fmt: skip
    "pre_norm": {"pre_norm": True},
    "no_class_token": {"class_token": False, "global_pool": "avg"},
    "no_pos": {"pos_embed": "none"},
    "patch_norm": {"embed_layer_norm": True},
}


def vit(cls=VisionTransformer, **kw) -> nn.Module:
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2,
          "num_classes": 5, **kw}  # fmt: skip
    if kw.pop("embed_layer_norm", False):
        kw["embed_norm_layer"] = nn.LayerNorm
    return randomise(cls(**kw)).eval()


def converted(model: nn.Module, device: str) -> tuple[nn.Module, nn.Module]:
    model = model.to(device)
    before = copy.deepcopy(model)
    summary = fuse_stems(model, backend="triton")
    assert [kind for _, kind in summary.converted] == ["whole stem: timm VisionTransformer"], str(
        summary
    )
    return model, before


@pytest.mark.parametrize("name", CONFIGS)
def test_stem_matches_timm(name, device, fused_path_calls, norm_calls) -> None:
    cfg = dict(CONFIGS[name])
    model, before = converted(vit(**cfg), device)
    x = torch.randn(2, 3, cfg.get("img_size", 32), cfg.get("img_size", 32), device=device)
    expected = before(x)
    norms_eager = len(norm_calls)
    norm_calls.clear()
    out = model(x)
    assert fused_path_calls == [1]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # The fused stem applied norm_pre and the patch norm: each one layer norm fewer.
    fused_norms = cfg.get("pre_norm", False) + cfg.get("embed_layer_norm", False)
    assert len(norm_calls) == norms_eager - fused_norms


@pytest.mark.parametrize("name", ["cls", "no_pos", "dynamic_img_size", "no_class_token"])
def test_empty_batch_as_timm(name, device) -> None:
    """An empty batch runs timm's own code (its patch embedding fused): an empty output, or
    timm's error where it raises (dynamic_img_size, no prefix tokens and no table: its view of
    0 elements)."""
    cfg = {"dynamic_img_size": {"dynamic_img_size": True},
           "no_pos": {"pos_embed": "none", "class_token": False, "global_pool": "avg"}}  # fmt: skip
    model, before = converted(vit(**cfg.get(name, CONFIGS.get(name, {}))), device)
    same_outcome(model, before, torch.randn(0, 3, 32, 32, device=device))


def test_distilled_deit(device, fused_path_calls) -> None:
    model, before = converted(vit(VisionTransformerDistilled), device)
    x = torch.randn(2, 3, 32, 32, device=device)
    torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-5)
    assert fused_path_calls == [1]


@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_dynamic_img_size_resamples_with_timm(size, device, fused_path_calls) -> None:
    model, before = converted(vit(dynamic_img_size=True, pre_norm=True), device)
    x = torch.randn(2, 3, *size, device=device)
    torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-5)
    assert fused_path_calls == [1]


@pytest.mark.parametrize("name", ["cls+reg", "pre_norm"])
def test_same_parameters_keys_and_gradients(name, device, fused_path_calls) -> None:
    model = vit(**CONFIGS[name])
    x = torch.randn(2, 3, 32, 32)
    check_drop_in(model, x, device, fused_path_calls, convert=fuse_stems)


def test_training_with_dropout_follows_timm(device, fused_path_calls, norm_calls) -> None:
    """pos_drop active: norm_pre must run after it (unfused), the stem itself stays fused."""
    model, before = converted(vit(pre_norm=True, pos_drop_rate=0.5), device)
    model.train(), before.train()
    x = torch.randn(2, 3, 32, 32, device=device)
    torch.manual_seed(1)
    expected = before.forward_features(x)
    norm_calls.clear()
    torch.manual_seed(1)
    out = model.forward_features(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert fused_path_calls == [1]
    assert len(norm_calls) == 4  # norm_pre ran itself, then the block's two and the final norm
    model.pos_drop.p = 0.0
    fused_path_calls.clear()
    out = model.forward_features(x)
    before.pos_drop.p = 0.0
    torch.testing.assert_close(out, before.forward_features(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_no_table_no_pos_drop(pre_norm, device, fused_path_calls, norm_calls) -> None:
    """pos_embed="none": timm returns from _pos_embed before pos_drop, so an active pos_drop
    changes nothing, and norm_pre stays fused."""
    model, before = converted(vit(pos_embed="none", pos_drop_rate=0.5, pre_norm=pre_norm), device)
    model.train(), before.train()
    x = torch.randn(2, 3, 32, 32, device=device)
    expected = before.forward_features(x)
    eager_norms = len(norm_calls)
    norm_calls.clear()
    torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-4, atol=1e-5)
    assert fused_path_calls == [1] and len(norm_calls) == eager_norms - pre_norm


def test_hooks_keep_timm_semantics(device, fused_path_calls, norm_calls) -> None:
    model, before = converted(vit(pre_norm=True), device)
    x = torch.randn(2, 3, 32, 32, device=device)
    expected = before(x)
    seen = []
    handle = model.patch_embed.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert seen == [(2, 16, 24)]  # the hook saw patch tokens, not the whole stem
    handle.remove()
    fused_path_calls.clear()
    handle = model.norm_pre.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    norm_calls.clear()
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert fused_path_calls == [1] and seen[-1] == (2, 17, 24)
    assert len(norm_calls) == 4  # norm_pre ran itself: its hook sees its input
    handle.remove()


def test_methods_outside_the_features_call_are_timms(device) -> None:
    model, before = converted(vit(pre_norm=True), device)
    x = torch.randn(2, 3, 32, 32, device=device)
    tokens = model.patch_embed(x)
    torch.testing.assert_close(tokens, before.patch_embed(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model._pos_embed(tokens), before._pos_embed(tokens))
    feats = model.forward_intermediates(x, indices=1)
    for a, b in zip(feats, before.forward_intermediates(x, indices=1), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError) as fused_error:
        model(torch.randn(1, 3, 24, 24, device=device))
    with pytest.raises(AssertionError) as timm_error:
        before(torch.randn(1, 3, 24, 24, device=device))
    assert str(fused_error.value) == str(timm_error.value)


def test_pickles_and_copies_as_a_fused_stem(device, fused_path_calls) -> None:
    model, before = converted(vit(reg_tokens=1, pre_norm=True), device)
    x = torch.randn(2, 3, 32, 32, device=device)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model) and type(clone.patch_embed) is type(model.patch_embed)
        fused_path_calls.clear()
        torch.testing.assert_close(clone(x), before(x), rtol=1e-4, atol=1e-5)
        assert fused_path_calls == [1]
    again = fuse_stems(model)
    assert not again.converted and ("", "fused VisionTransformer, backend 'auto'") in (
        again.already_fused
    ), str(again)


def test_unknown_subclass_is_reported() -> None:
    class OwnPosEmbed(VisionTransformer):
        def _pos_embed(self, x):
            return super()._pos_embed(x) * 2

    summary = fuse_stems(vit(OwnPosEmbed))
    assert any("overrides _pos_embed" in why for _, why in summary.skipped), str(summary)
    assert summary.converted == [("patch_embed", "timm PatchEmbed")]


class MaeViT(VisionTransformer):
    """The stem as the MAE repository's models_vit.py (widely copied) writes it: its own
    forward_features calls patch_embed, then adds the class token and the table itself."""

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # (timm's attn_mask)
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


@pytest.mark.parametrize("class_token", [True, False])
def test_subclass_building_its_own_stem(class_token, device, fused_path_calls) -> None:
    """A subclass overriding forward_features keeps its stem: only its patch embedding is
    fused, and the summary says why the whole stem is not."""
    kw = {} if class_token else {"class_token": False, "global_pool": "avg"}
    model = vit(MaeViT, **kw).to(device)
    before = copy.deepcopy(model)
    summary = fuse_stems(model, backend="triton")
    assert summary.converted == [("patch_embed", "timm PatchEmbed")], str(summary)
    assert any("overrides VisionTransformer.forward_features" in why
               for _, why in summary.skipped), str(summary)  # fmt: skip
    x = torch.randn(2, 3, 32, 32, device=device)
    torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-5)
    assert fused_path_calls == [1]


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch14_dinov2",
        "vit_small_patch14_reg4_dinov2",
        "deit_tiny_distilled_patch16_224",
        "vit_base_patch16_clip_224",
    ],  # fmt: skip
)
def test_timm_model_registry(name, device, fused_path_calls) -> None:
    """timm's own model definitions (tiny: one block, small images), as create_model builds
    them: DINOv2 (its class position folded, patch 14), DINOv2 with registers, DeiT distilled,
    a CLIP-style ViT with norm_pre."""
    patch = 14 if "patch14" in name else 16
    model = timm.create_model(name, pretrained=False, img_size=2 * patch, depth=1,
                              num_classes=3)  # fmt: skip
    model, before = converted(randomise(model).eval(), device)
    x = torch.randn(2, 3, 2 * patch, 2 * patch, device=device)
    torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-4)
    assert fused_path_calls == [1]


def test_compile_fullgraph_keeps_the_fused_stem(device, fused_calls) -> None:
    torch._dynamo.reset()
    model, before = converted(vit(pre_norm=True, reg_tokens=1), device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32, device=device)
    y = compiled(x)
    assert fused_calls, "the compiled graph does not call the fused op"
    torch.testing.assert_close(y, before(x), rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    before(x).square().sum().backward()
    for p, p_ref in zip(model.parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("patch_drop", ["identity", "dropout"])
def test_compile_fullgraph_with_dropouts_traced_as_other_tensors(patch_drop, device, fused_calls,
                                                                 monkeypatch) -> None:  # fmt: skip
    """torch 2.11's dynamo gives a traced dropout that keeps the tensor (eval, a rate of 0) an
    output of its own (2.14's keeps the input's); done here on any version. pos_drop, then a
    Dropout as patch_drop, must not break the hand-off to norm_pre (it raised in torch 2.11)."""
    real = nn.Dropout.forward
    monkeypatch.setattr(nn.Dropout, "forward", lambda self, x: real(self, x).clone())
    model = vit(pre_norm=True, reg_tokens=1)
    if patch_drop == "dropout":
        model.patch_drop = nn.Dropout(0.0).eval()
    model, before = converted(model, device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32, device=device)
    torch.testing.assert_close(compiled(x), before(x), rtol=1e-4, atol=1e-5)
    assert fused_calls, "the compiled graph does not call the fused op"


@pytest.mark.parametrize("convert", ["fuse_stems", "fuse_patch_embeddings"])
def test_compile_fullgraph_at_another_size(convert, device, fused_calls) -> None:
    """dynamic_img_size, compiled (fullgraph) and trained at two image sizes, as the unconverted
    model compiled the same way: each size gets its own graph, as timm's PatchEmbed makes it (a
    graph with symbolic sizes reaches a PyTorch bug in the backward of the table's antialiased
    bicubic resampling)."""
    import zeta_fused

    model = vit(dynamic_img_size=True).to(device)
    before = copy.deepcopy(model)
    getattr(zeta_fused, convert)(model, backend="triton")
    graphs = {}
    for name, m in (("timm", before), ("fused", model)):
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        for size in ((32, 32), (40, 24)):
            x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
            m.zero_grad()
            y = compiled(x)
            y.square().sum().backward()
            graphs[name, size] = (y, [p.grad for p in m.parameters()])
    assert fused_calls  # the fused graphs call the op
    for size in ((32, 32), (40, 24)):
        (y, grads), (y_ref, grads_ref) = graphs["fused", size], graphs["timm", size]
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def _update_pos_embed(model: nn.Module, x: torch.Tensor, how: str) -> None:
    if how == "ema":  # a MoCo / BYOL / DINO teacher: through .data, which bumps no version
        model.pos_embed.data.mul_(0.5).add_(0.1)
    else:  # the fused optimizers do not bump the parameters' versions either
        cls = torch.optim.AdamW if how == "adamw_fused" else torch.optim.Adam
        optimizer = cls(model.parameters(), lr=0.1, fused=True)
        model(x).square().sum().backward()
        optimizer.step()


@pytest.mark.parametrize("how", ["ema", "adam_fused", "adamw_fused"])
def test_resampled_table_follows_every_update(how, device, fused_path_calls) -> None:
    """dynamic_img_size at another size: the table resampled from pos_embed as it is now,
    whatever updated it in place since the last call."""
    model, before = converted(vit(dynamic_img_size=True), device)
    x = torch.randn(2, 3, 40, 24, device=device)
    for step in range(2):
        if step:
            _update_pos_embed(model, x, how)
            before.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-5)
    assert fused_path_calls


def test_table_resampled_under_inference_mode_then_trained(device, fused_path_calls) -> None:
    """A frozen table at another size, first under inference_mode, then in a training step:
    the step gives timm's gradients (no inference tensor reaches autograd)."""
    model, before = converted(vit(dynamic_img_size=True), device)
    for m in (model, before):
        m.pos_embed.requires_grad_(False)
    x = torch.randn(2, 3, 40, 24, device=device)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-5)
    model(x).square().sum().backward()
    before(x).square().sum().backward()
    for p, p_ref in zip(model.parameters(), before.parameters(), strict=True):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5)
    assert len(fused_path_calls) == 2


def test_handoff_norm_never_normalises_twice() -> None:
    """Within its owner's call, the hand-off LayerNorm returns the stem's output as it is once,
    normalises anything after that, and raises for another tensor while a hand-off is pending;
    outside one it is a LayerNorm."""
    from zeta_fused.integrations import _base as stems

    owner, stem, norm = nn.Identity(), nn.Identity(), randomise(nn.LayerNorm(8))
    stems.handoff_class(norm)
    y = torch.randn(2, 3, 8)
    expected = torch.nn.functional.layer_norm(y, (8,), norm.weight, norm.bias, norm.eps)
    with stems.handoff_scope(owner, stem, norm):
        assert stems.pending_norm(stem, 8) is norm
        stems.hand_off(norm, y)
        assert norm(y) is y
        torch.testing.assert_close(norm(y), expected)
        stems.hand_off(norm, y)
        with pytest.raises(RuntimeError, match="another tensor than the stem's output"):
            norm(y.clone())
    assert stems.pending_norm(stem, 8) is None
    torch.testing.assert_close(norm(y), expected)


def test_patch_embeddings_converted_first(device, fused_path_calls, norm_calls) -> None:
    """fuse_patch_embeddings, then fuse_stems: the fused PatchEmbed becomes the stem's."""
    from zeta_fused import fuse_patch_embeddings

    model = vit(pre_norm=True).to(device)
    before = copy.deepcopy(model)
    assert [n for n, _ in fuse_patch_embeddings(model, backend="triton").converted] == [
        "patch_embed"
    ]
    summary = fuse_stems(model, backend="triton")
    assert [kind for _, kind in summary.converted] == ["whole stem: timm VisionTransformer"]
    x = torch.randn(2, 3, 32, 32, device=device)
    expected = before(x)
    norm_calls.clear()
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert fused_path_calls == [1] and len(norm_calls) == 3  # norm_pre fused with the stem
