"""The benchmark's whole-stem presets: each model's own stem against its fused twin (the same
parameters through ``zeta_fused.functional.patch_embed``), on tiny versions of the same model
configs; their figures, cells, goals, and a missing model package."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

from bench import goals, model_stems, runner
from bench.presets import PRESETS, QUICK, STEM_PRESETS, StemPreset
from bench.providers import PROVIDERS

# Tiny versions of each preset (same model, prefix rows, bias and norm): (patch, grid, width).
# Odd grids and a K that is no multiple of a tile; 4 channels for DiT's latents as in its preset.
TINY_SIZES = {
    "vit_b16_stem": (8, 3, 48),
    "clip_l14_336_stem": (7, 3, 32),
    "dinov2_l14_reg_stem": (7, 3, 32),
    "sam_b16_1024_stem": (8, 3, 48),
    "dit_xl2_256_stem": (2, 5, 32),
}


def tiny(name: str) -> StemPreset:
    patch, grid, dim = TINY_SIZES[name]
    hw = patch * grid
    return dataclasses.replace(PRESETS[name], name=f"tiny_{name}", batch=2, height=hw, width=hw,
                               patch=(patch, patch), dim=dim, dtype="fp32")  # fmt: skip


def build_peer(p: StemPreset) -> model_stems.PeerStem:
    """The model's stem with every parameter perturbed: zero-initialised tokens and tables
    (SAM's, DINOv2's), unit norms would hide a wrong mapping."""
    try:
        peer = model_stems.peer(p)
    except model_stems.MissingPeer as exc:
        pytest.skip(str(exc))
    with torch.no_grad():
        for q in peer.parameters():
            q.add_(0.2 * torch.randn_like(q))
    return peer


def test_every_stem_preset_has_a_tiny_version() -> None:
    assert set(TINY_SIZES) == set(STEM_PRESETS)
    assert ("vit_b16_stem", ("fwd", "train")) in QUICK


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("name", STEM_PRESETS)
def test_fused_stem_equals_the_models_stem(name, backend, device, fused_path_calls) -> None:
    """Output, every parameter gradient and the image gradient of the fused twin (eager path;
    the Triton kernels, through the interpreter on a CPU) equal the model's own stem in fp32.
    The model's stem runs on the CPU: cuDNN's TF32 convolutions would blur the reference."""
    p = tiny(name)
    peer = build_peer(p)
    twin = model_stems.FusedStem(copy.deepcopy(peer), backend)
    where = device if backend == "triton" else "cpu"
    twin.to(where)
    x = torch.randn(p.batch, p.channels, p.height, p.width, requires_grad=True)
    x_twin = x.detach().to(where).requires_grad_()
    expected, got = peer(x), twin(x_twin)
    assert len(fused_path_calls) == (backend == "triton")  # one fused call, or the eager path
    out_shape = (2, p.height // p.patch[0], p.width // p.patch[1], p.dim)
    assert expected.shape == (out_shape if p.peer == "sam_vit" else (2, p.out_rows, p.dim))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(expected)
    expected.backward(dy)
    got.backward(dy.to(where))
    torch.testing.assert_close(x_twin.grad.cpu(), x.grad, rtol=1e-4, atol=1e-5)
    theirs = dict(twin.peer.named_parameters())
    for key, q in peer.named_parameters():
        if q.grad is None:  # DINOv2's mask_token: never read without a mask, in either path
            assert theirs[key].grad is None, key
            continue
        assert theirs[key].grad is not None, f"{name}: no gradient for {key}"
        torch.testing.assert_close(theirs[key].grad.cpu(), q.grad, rtol=1e-4, atol=1e-5, msg=key)


def test_stem_figures_count_the_whole_stem() -> None:
    """vit_b16_stem by hand: image, weight, bias, the (1 + N)-row table and the class token
    read once, B x (1 + N) rows written; flops are the projection GEMM's."""
    p = PRESETS["vit_b16_stem"]
    assert (p.tokens, p.patch_dim, p.out_rows) == (196, 768, 197)
    elems = 256 * 3 * 224 * 224 + 256 * 197 * 768 + 768 * 768 + 768 * (1 + 197 + 1)
    assert p.bytes() == 2 * elems
    assert p.flops() == 2 * 256 * 196 * 768 * 768
    clip, dino = PRESETS["clip_l14_336_stem"], PRESETS["dinov2_l14_reg_stem"]
    assert (clip.patch_dim, clip.dim, clip.batch, clip.out_rows) == (588, 1024, 64, 577)
    assert clip.table_elems() == 1024 * (588 + 577 + 1 + 2)  # no bias; ln_pre's two vectors
    assert (dino.prefix, dino.out_rows, dino.table_elems()) == (5, 261, 1024 * (588 + 257 + 5 + 1))


@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_stem_providers_build_and_step(mode, device) -> None:
    """The three providers of a stem preset build the model's stem (fused: the interpreter on a
    CPU) and take a step; a training step gives every parameter a gradient."""
    p = tiny("vit_b16_stem")
    assert runner._providers_of(p, list(PROVIDERS)) == ["zeta-fused", "eager", "compile"]
    for name in ("zeta-fused", "eager"):
        model, step = PROVIDERS[name].build(p, device, mode)
        assert isinstance(getattr(model, "peer", model), model_stems.TimmViT)
        step()
        if mode == "train":
            assert all(q.grad is not None for q in model.parameters())


def test_compile_peer_is_the_models_stem(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(model) or model)
    PROVIDERS["compile"].build(tiny("clip_l14_336_stem"), "cpu", "fwd")
    assert len(seen) == 1 and isinstance(seen[0], model_stems.CLIPVision)


@pytest.mark.parametrize("missing, dist", [("segment_anything", "segment-anything"),
                                           ("torchvision", "torchvision")])  # fmt: skip
def test_missing_model_package_skips_its_preset_only(missing, dist, monkeypatch) -> None:
    """Without segment_anything (or torchvision, which its package imports) the SAM stem's
    cells are skipped, saying what to carry; the other stems of the run are measured."""
    for mod in [m for m in sys.modules if m.split(".")[0] in ("segment_anything", missing)]:
        monkeypatch.delitem(sys.modules, mod)  # imported afresh, then put back
    monkeypatch.setitem(sys.modules, missing, None)
    plan = [(tiny("sam_b16_1024_stem"), ("fwd",)), (tiny("dit_xl2_256_stem"), ("fwd",))]
    rows, _, _ = runner.run(plan, ["zeta-fused", "eager"], "cpu")
    sam = [r for r in rows if r["preset"] == "tiny_sam_b16_1024_stem" and r["provider"] == "eager"]
    assert sam[0]["status"] == "skipped"
    assert sam[0]["error"].startswith("segment_anything.modeling.image_encoder does not import")
    assert (
        f"carry its wheel (pip download --no-deps --only-binary=:all: {dist} -d" in sam[0]["error"]
    )
    dit = [r for r in rows if r["preset"] == "tiny_dit_xl2_256_stem" and r["provider"] == "eager"]
    assert dit[0]["status"] == "ok" and dit[0]["tbps"] > 0


def test_stem_goals_are_judged_on_the_runs_figures() -> None:
    def row(preset, mode, provider, ms, **extra):
        return {"preset": preset, "mode": mode, "provider": provider, "ms": ms} | extra

    rows = [
        row("vit_b16_stem", "fwd", "zeta-fused", 0.2, pct_roofline=65.0),
        row("vit_b16_stem", "fwd", "eager", 0.5),
        row("vit_b16_stem", "fwd", "compile", 0.28),  # 1.4x: short of 1.5x
        row("vit_b16_stem", "train", "zeta-fused", 0.5),
        row("vit_b16_stem", "train", "compile", 1.1),
        row("clip_l14_336_stem", "fwd", "zeta-fused", 0.1, pct_roofline=40.0),
        row("clip_l14_336_stem", "fwd", "eager", 0.3),
    ]
    got = {v.goal: v for v in goals.judge(rows, {})}
    assert got["vit_b16_stem forward >= 60% of the roofline"].met is True
    assert got["clip_l14_336_stem forward >= 60% of the roofline"].met is False
    fwd = got["vit_b16_stem forward >= 1.5x the fastest peer"]
    assert fwd.met is False and "1.40x the fastest peer (compile)" in fwd.detail
    assert got["clip_l14_336_stem forward >= 1.5x the fastest peer"].met is True
    assert got["vit_b16_stem train >= 2x the fastest peer"].met is True
    assert got["sam_b16_1024_stem forward >= 1.5x the fastest peer"].met is None
