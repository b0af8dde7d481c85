"""Token dropping in converted stems: timm's ``patch_drop`` and OpenCLIP's ``patch_dropout``
active (training): the stem draws the patches to keep as the peer draws them, so a seeded run
gives the peer's outputs, gradients and random-number consumption, and embeds only the kept
patches (no full-length token tensor is built)."""

from __future__ import annotations

import copy

import pytest
import torch
from support import no_full_length_tokens, randomise, same_random_run
from torch import nn

from zeta_fused import fuse_stems

TOL = {"rtol": 1e-4, "atol": 1e-5}
IMAGE = (2, 3, 32, 32)  # a 4 x 4 grid of 8 x 8 patches


def converted(model: nn.Module, device: str) -> tuple[nn.Module, nn.Module]:
    """(the converted model, an unconverted copy) on ``device``."""
    model = randomise(model).to(device)
    before = copy.deepcopy(model)
    summary = fuse_stems(model, backend="triton")
    assert len(summary.converted) == 1 and not summary.already_fused, str(summary)
    again = fuse_stems(model, backend="triton")  # the drop module is part of the stem
    assert not any(name.startswith("patch_drop") for name, _ in again.already_fused), str(again)
    return model, before


# ---------------------------------------------------------------- timm

timm_vit = pytest.importorskip("timm.models.vision_transformer")

TIMM = {
    "cls+reg+pre_norm": {"reg_tokens": 2, "pre_norm": True},
    "no_prefix": {"class_token": False, "global_pool": "avg"},
    "no_embed_class": {"no_embed_class": True, "reg_tokens": 1},
    "no_table": {"pos_embed": "none", "pos_drop_rate": 0.5},  # timm skips pos_drop then
}


def timm_model(**kw) -> nn.Module:
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2,
          "num_classes": 5, "patch_drop_rate": 0.5, **kw}  # fmt: skip
    return timm_vit.VisionTransformer(**kw)


@pytest.mark.parametrize("name", TIMM)
def test_timm_patch_drop_draws_as_timm(name, device, fused_path_calls, norm_calls) -> None:
    model, before = converted(timm_model(**TIMM[name]), device)
    x = torch.randn(*IMAGE, device=device)
    out = same_random_run(model, before, x, fused_path_calls, method="forward_features")
    assert out[0].shape[1] == model.num_prefix_tokens + 8  # half of the 16 patches
    no_full_length_tokens(model, x, "forward_features", 16, 24, model.num_prefix_tokens)
    # norm_pre after the drop: applied by the stem (one norm fewer than timm runs).
    model.train()
    counts = []
    for m in (before, model):
        norm_calls.clear()
        m.forward_features(x)
        counts.append(len(norm_calls))
    assert counts[1] == counts[0] - TIMM[name].get("pre_norm", False)


def test_timm_patch_drop_ordered_and_whole_model(device, fused_path_calls) -> None:
    model, before = converted(timm_model(reg_tokens=1), device)
    model.patch_drop.ordered = before.patch_drop.ordered = True
    same_random_run(model, before, torch.randn(*IMAGE, device=device), fused_path_calls)


def test_timm_patch_drop_builds_only_kept_tokens(device) -> None:
    model, before = converted(timm_model(reg_tokens=2, pre_norm=True), device)
    x = torch.randn(*IMAGE, device=device)
    seen = no_full_length_tokens(model.train(), x, "forward_features", 16, 24, 3)
    assert (2, 3 + 8, 24) in seen
    with pytest.raises(AssertionError, match="full-length"):  # the check sees timm's own
        no_full_length_tokens(before.train(), x, "forward_features", 16, 24, 3)


def test_timm_patch_drop_in_eval_is_fused(device, fused_path_calls, norm_calls) -> None:
    """Eval (or a rate of 0): patch_drop returns its input; norm_pre fused."""
    model, before = converted(timm_model(pre_norm=True).eval(), device)
    x = torch.randn(*IMAGE, device=device)
    expected = before(x)
    eager_norms = len(norm_calls)
    norm_calls.clear()
    torch.testing.assert_close(model(x), expected, **TOL)
    assert fused_path_calls == [1] and len(norm_calls) == eager_norms - 1
    model.train().patch_drop.prob = before.train().patch_drop.prob = 0.0
    same_random_run(model, before, x, fused_path_calls)


def test_timm_pos_drop_then_patch_drop_as_timm(device, fused_path_calls) -> None:
    """pos_drop active: timm drops patches from the tokens pos_drop changed, so the whole stem
    is fused and pos_drop, patch_drop and norm_pre run after it."""
    model, before = converted(timm_model(pos_drop_rate=0.3, pre_norm=True), device)
    seen = []
    real = model.patch_drop.forward
    model.patch_drop.forward = lambda t: seen.append(t.shape) or real(t)
    same_random_run(model, before, torch.randn(*IMAGE, device=device), fused_path_calls,
                    method="forward_features")  # fmt: skip
    assert seen == [(2, 17, 24)]


def test_timm_hook_on_patch_drop_sees_every_token(device, fused_path_calls) -> None:
    model, before = converted(timm_model(), device)
    seen = []
    for m in (model, before):
        m.patch_drop.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    same_random_run(model, before, torch.randn(*IMAGE, device=device), fused_path_calls)
    assert seen == [(2, 17, 24)] * 2


def test_timm_op_declining_after_the_draw(device, monkeypatch, fused_path_calls) -> None:
    """The stem drew, then the op could not run (a wrapper operand): timm's code runs and
    patch_drop keeps the patches drawn (drawing again would consume other random numbers)."""
    import zeta_fused.integrations.timm as integration

    model, before = converted(timm_model(pre_norm=True), device)
    monkeypatch.setattr(integration, "fused_call", lambda *args: None)
    same_random_run(model, before, torch.randn(*IMAGE, device=device), fused_path_calls,
                    expect_calls=0)  # fmt: skip


# ---------------------------------------------------------------- OpenCLIP


def clip_model(**kw) -> nn.Module:
    transformer = pytest.importorskip("open_clip.transformer", reason="open_clip is a test extra")
    args = dict(image_size=32, patch_size=8, width=24, layers=1, heads=2, mlp_ratio=2.0,
                output_dim=16, patch_dropout=0.5, output_tokens=True)  # fmt: skip
    return transformer.VisionTransformer(**(args | kw))


def test_open_clip_patch_dropout_draws_as_open_clip(device, fused_path_calls, norm_calls):
    model, before = converted(clip_model(), device)
    x = torch.randn(*IMAGE, device=device)
    pooled, tokens = same_random_run(model, before, x, fused_path_calls, parts=list)
    assert tokens.shape[1] == 8
    counts = []
    for m in (before, model):
        norm_calls.clear()
        m.train()(x)
        counts.append(len(norm_calls))
    assert counts[1] == counts[0] - 1  # ln_pre applied by the stem


def test_open_clip_patch_dropout_builds_only_kept_tokens(device) -> None:
    model, before = converted(clip_model(), device)
    x = torch.randn(*IMAGE, device=device)
    seen = no_full_length_tokens(model.train(), x, "_embeds", 16, 24, 1)
    assert (2, 1 + 8, 24) in seen
    with pytest.raises(AssertionError, match="full-length"):
        no_full_length_tokens(before.train(), x, "_embeds", 16, 24, 1)


@pytest.mark.parametrize("case", ["hook_on_ln_pre", "hook_on_patch_dropout", "first_token_too"])
def test_open_clip_patch_dropout_that_runs_itself(case, device, fused_path_calls) -> None:
    """A hook on ln_pre: it runs on the kept tokens; on patch_dropout, or without
    exclude_first_token (the class row may be dropped): patch_dropout runs on every token."""
    model, before = converted(clip_model(), device)
    seen = []
    for m in (model, before):
        if case == "first_token_too":
            m.patch_dropout.exclude_first_token = False
        else:
            module = m.ln_pre if case == "hook_on_ln_pre" else m.patch_dropout
            module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    same_random_run(model, before, torch.randn(*IMAGE, device=device), fused_path_calls,
                    parts=list)  # fmt: skip
    assert seen == {"hook_on_ln_pre": [9, 9], "hook_on_patch_dropout": [17, 17]}.get(case, [])


def test_open_clip_op_declining_after_the_draw(device, monkeypatch, fused_path_calls) -> None:
    import zeta_fused.integrations._base as base

    model, before = converted(clip_model(), device)
    monkeypatch.setattr(base, "fused_call", lambda *args: None)
    same_random_run(model, before, torch.randn(*IMAGE, device=device), fused_path_calls,
                    expect_calls=0, parts=list)  # fmt: skip
