"""The benchmark's token-subset presets: each model's own embed-then-gather stem against its
fused twin (the same parameters and kept patches through ``patch_embed(..., keep=ids)``) on
tiny versions of the same model configs; the kept counts as each model rounds them, the same
kept patches for every provider, the modelled figures, the CPU run that reports them without
timing anything, and the goals."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from support import ROOT, randomise

from bench import conv_stems, goals, model_stems, report, runner, subset_stems
from bench.__main__ import parse_args, plan_for
from bench.presets import PRESETS, SUBSET_PRESETS, SubsetPreset
from bench.providers import PROVIDERS

# Tiny versions of each preset (same model, prefix, bias and norm): spatial, patch, width and
# the kept count each model's own rounding gives at that grid (4 x 4 patches per frame).
TINY_SIZES = {
    "mae_l16_subset": ((32, 32), (8, 8), 48, 4),  # int(16 x 0.25)
    "videomae_b16_subset": ((4, 32, 32), (2, 8, 8), 32, 4),  # 2 frames x (16 - int(16 x 0.9))
    "flip_b16_subset": ((32, 32), (8, 8), 32, 8),  # int(16 x 0.5)
}


def tiny(name: str, batch: int = 2) -> SubsetPreset:
    spatial, patch, dim, kept = TINY_SIZES[name]
    return dataclasses.replace(PRESETS[name], name=f"tiny_{name}", batch=batch, spatial=spatial,
                               patch=patch, dim=dim, kept=kept, dtype="fp32")  # fmt: skip


def build_peer(p: SubsetPreset) -> model_stems.PeerStem:
    """The model's stem with every parameter perturbed: zero-initialised class tokens and unit
    norms would hide a wrong mapping."""
    try:
        return randomise(subset_stems.peer(p), 0.2)
    except model_stems.MissingPeer as exc:
        pytest.skip(str(exc))


def test_every_subset_preset_has_a_tiny_version() -> None:
    assert set(TINY_SIZES) == set(SUBSET_PRESETS) and len(SUBSET_PRESETS) == 3


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("name", SUBSET_PRESETS)
def test_fused_subset_equals_the_models_embed_then_gather(name, backend, device,
                                                          fused_path_calls) -> None:  # fmt: skip
    """Output, every trainable parameter's gradient and the image gradient of the fused twin
    (eager path; the Triton kernels, through the interpreter on a CPU) equal the model's own
    embed-then-gather in fp32, with the same kept patches."""
    p = tiny(name)
    peer = build_peer(p)
    twin = model_stems.FusedStem(copy.deepcopy(peer), backend)
    where = device if backend == "triton" else "cpu"
    twin.to(where)
    x = conv_stems.make_input(p, "cpu", "train_x")
    x_twin = x.detach().to(where).requires_grad_()
    expected, got = peer(x), twin(x_twin)
    assert len(fused_path_calls) == (backend == "triton")
    assert expected.shape == (2, p.prefix + p.kept, p.dim)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(expected)
    expected.backward(dy)
    got.backward(dy.to(where))
    torch.testing.assert_close(x_twin.grad.cpu(), x.grad, rtol=1e-4, atol=1e-5)
    assert (x.grad == 0).any()  # the patches not kept
    theirs = dict(twin.peer.named_parameters())
    for key, q in peer.named_parameters():
        if not q.requires_grad:  # MAE's fixed sincos table
            assert theirs[key].grad is None, key
            continue
        assert theirs[key].grad is not None, f"{name}: no gradient for {key}"
        torch.testing.assert_close(theirs[key].grad.cpu(), q.grad, rtol=1e-4, atol=1e-5, msg=key)


def _rows_kept_by_the_model(p: SubsetPreset) -> int:
    """Patch rows the model's own masking keeps at the preset's grid (a (1, N, 1) sequence)."""
    if p.peer == "mae":
        e = subset_stems.MAE(dataclasses.replace(p, batch=1, dim=16)).embeddings
        return e.random_masking(torch.zeros(1, p.tokens, 1))[0].shape[1]
    if p.peer == "flip":
        drop = pytest.importorskip("open_clip.transformer").PatchDropout(p.drop)
        return drop(torch.zeros(1, 1 + p.tokens, 1)).shape[1] - 1
    # VideoMAE's TubeMaskingGenerator: int(ratio x positions) masked per frame, in every frame.
    frames = p.spatial[0] // p.patch[0]
    per_frame = p.tokens // frames
    return frames * (per_frame - int(p.drop * per_frame))


@pytest.mark.parametrize("name", SUBSET_PRESETS)
def test_kept_counts_are_the_models_rounding(name) -> None:
    p = PRESETS[name]
    try:
        assert p.kept == _rows_kept_by_the_model(p)
    except model_stems.MissingPeer as exc:
        pytest.skip(str(exc))
    assert (p.tokens, p.kept) == {"mae_l16_subset": (196, 49), "flip_b16_subset": (196, 98),
                                  "videomae_b16_subset": (1568, 160)}[name]  # fmt: skip


@pytest.mark.parametrize("name", SUBSET_PRESETS)
def test_every_provider_keeps_the_same_patches(name) -> None:
    """Each provider builds its own stem: the kept patches come from a fixed seed, so all the
    providers of a cell embed the same ones; they differ per image and are in range."""
    first, second = build_peer(tiny(name, batch=3)), build_peer(tiny(name, batch=3))
    pairs = zip(first.named_buffers(), second.named_buffers(), strict=True)
    # The index (noise ranks, mask, kept positions), not the tables.
    indices = [(key, a, b) for (key, a), (_, b) in pairs if a.dtype in (torch.int64, torch.bool)]
    assert len(indices) == 1, [key for key, _, _ in indices]
    for key, a, b in indices:
        assert torch.equal(a, b), key
        assert not torch.equal(a[0], a[1]), key


def test_tube_mask_is_the_same_in_every_frame() -> None:
    p = tiny("videomae_b16_subset", batch=4)
    mask = subset_stems.tube_mask(p, torch.Generator().manual_seed(3))
    frames = mask.view(4, 2, 16)
    assert torch.equal(frames[:, 0], frames[:, 1])
    assert ((~mask).sum(1) == p.kept).all()
    with pytest.raises(ValueError, match="multiple of 2"):
        subset_stems.tube_mask(dataclasses.replace(p, kept=5), torch.Generator())


def test_subset_figures_count_the_kept_patches_only() -> None:
    """mae_l16_subset by hand (bf16): the fused path reads the 49 kept patches and writes 1 + 49
    rows; embed-then-gather reads every pixel, writes 196 tokens, reads 49 back, writes 1 + 49;
    both read the weight, bias, the (1 + 196)-row table and the class token once."""
    p = PRESETS["mae_l16_subset"]
    tables = 1024 * 768 + 1024 * (1 + 197 + 1)
    subset = 64 * 49 * 768 + 64 * 50 * 1024 + tables
    gather = 64 * 3 * 224 * 224 + 64 * (196 + 49 + 50) * 1024 + tables
    m = p.modelled()
    assert (m["subset_bytes"], m["gather_bytes"]) == (2 * subset, 2 * gather)
    assert (p.bytes(), p.gather_bytes()) == (2 * subset, 2 * gather)
    assert m["subset_flops"] == p.flops() == 2 * 64 * 49 * 768 * 1024
    assert m["flops_ratio"] == 4.0 and m["bytes_ratio"] == pytest.approx(gather / subset)
    video, flip = PRESETS["videomae_b16_subset"].modelled(), PRESETS["flip_b16_subset"].modelled()
    assert video["flops_ratio"] == pytest.approx(1568 / 160) and flip["flops_ratio"] == 2.0
    assert video["bytes_ratio"] > 8 and 2 < flip["bytes_ratio"] < 3


def test_performance_page_states_the_modelled_ratios() -> None:
    """The modelled ratios docs/performance.md quotes are the presets' own (a changed preset
    changes them)."""
    text = " ".join((ROOT / "docs" / "performance.md").read_text().split())
    for model, name in [("MAE", "mae_l16_subset"), ("VideoMAE", "videomae_b16_subset"),
                        ("FLIP", "flip_b16_subset")]:  # fmt: skip
        m = PRESETS[name].modelled()
        stated = f" {model} {m['bytes_ratio']:.2f}x bytes and {m['flops_ratio']:.2f}x flops"
        assert stated in text, stated


@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_subset_providers_build_and_step(mode, device) -> None:
    """The three providers of a subset preset build the model's stem (fused: the interpreter
    on a CPU) and take a step; a training step gives every trainable parameter a gradient."""
    p = tiny("mae_l16_subset")
    assert runner._providers_of(p, list(PROVIDERS)) == ["zeta-fused", "eager", "compile"]
    for name in ("zeta-fused", "eager"):
        try:
            model, step = PROVIDERS[name].build(p, device, mode)
        except model_stems.MissingPeer as exc:
            pytest.skip(str(exc))
        assert isinstance(getattr(model, "peer", model), subset_stems.MAE)
        step()
        if mode == "train":
            assert all(q.grad is not None for q in model.parameters() if q.requires_grad)


def test_compile_peer_is_the_models_stem(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(model) or model)
    try:
        PROVIDERS["compile"].build(tiny("flip_b16_subset"), "cpu", "fwd")
    except model_stems.MissingPeer as exc:
        pytest.skip(str(exc))
    assert len(seen) == 1 and isinstance(seen[0], subset_stems.FLIP)


def test_subset_group_and_cpu_default_plan() -> None:
    """--preset subset: the three presets, forward and training step. With nothing asked on a
    CPU, the subset presets come with no mode: no cell of theirs is timed."""
    plan = plan_for(parse_args(["--preset", "subset"]), "cuda")
    assert [(p.name, ms) for p, ms in plan] == [(n, ("fwd", "train")) for n in SUBSET_PRESETS]
    plan = plan_for(parse_args([]), "cpu")
    assert [(p.name, ms) for p, ms in plan[1:]] == [(n, ()) for n in SUBSET_PRESETS]
    p = tiny("mae_l16_subset")
    assert runner.run([(p, ())], ["eager"], "cpu")[0] == []
    build_peer(p)  # skips where transformers cannot build the model (the eager provider's)
    (row,) = runner.run([(p, ("fwd",))], ["eager"], "cpu")[0]  # its roofline: the kept work
    assert row["status"] == "ok", row
    assert row["tbps"] == pytest.approx(p.bytes() / row["ms"] / 1e9)


def test_cpu_run_reports_the_modelled_ratios_and_no_timing(tmp_path) -> None:
    """`python -m bench` without a GPU: bench.json, bench.md and the terminal give each subset
    preset's modelled bytes and flops ratios; no row of theirs has a time."""
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the default run is the quick GPU benchmark")
    args = ["--modes", "fwd", "--providers", "eager", "--out", str(tmp_path)]
    r = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                       cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["modelled"] == {n: json.loads(json.dumps(PRESETS[n].modelled()))
                               for n in SUBSET_PRESETS}  # fmt: skip
    assert {x["preset"] for x in doc["results"]} == {"cpu_small"}
    md = (tmp_path / "bench.md").read_text()
    for text in (md, r.stdout):
        assert "Token subsets, modelled, not measured" in text
        assert "mae_l16_subset (49 of 196 patches kept): bytes 59.9 MB / 13.4 MB = 4.49x" in text
        assert "flops 118.4 GFLOP / 12.1 GFLOP = 9.80x" in text  # VideoMAE's
    assert "- flip_b16_subset (98 of 196 patches kept)" in md


def test_subset_goals_are_judged_on_the_runs_figures() -> None:
    def row(preset, mode, provider, ms):
        return {"preset": preset, "mode": mode, "provider": provider, "ms": ms}

    rows = [
        row("mae_l16_subset", "fwd", "zeta-fused", 0.05),
        row("mae_l16_subset", "fwd", "eager", 0.3),
        row("mae_l16_subset", "fwd", "compile", 0.2),
        row("mae_l16_subset", "train", "zeta-fused", 0.5),
        row("mae_l16_subset", "train", "compile", 0.4),
    ]
    verdicts = goals.judge(rows, {})
    got = {v.goal: v for v in verdicts}
    assert len(got) == len(verdicts)  # the forward goal is not judged twice
    fwd = got["mae_l16_subset forward faster than every peer"]
    assert fwd.met is True and "4.00x the fastest peer (compile)" in fwd.detail
    assert got["mae_l16_subset train faster than every peer"].met is False
    assert got["videomae_b16_subset forward faster than every peer"].met is None
    assert got["flip_b16_subset train faster than every peer"].met is None
    assert report.goal_lines(rows, {})[0] == "Goals, judged on this run:"
