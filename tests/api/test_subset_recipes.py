"""The token-subset recipes of docs/usage.md, run as written (each code block of "Recipes: the
models' own parameters and kept patches"), against each model's own stem with the same random
draw: MAE and VideoMAE (transformers), timm PatchDropout, OpenCLIP patch_dropout (FLIP)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from support import ROOT, randomise

from zeta_fused import patch_embed

USAGE = ROOT / "docs" / "usage.md"
LIBRARIES = ["MAE", "VideoMAE", "timm", "OpenCLIP"]
B, N = 3, 16  # 4 x 4 patches per image (per frame for VideoMAE)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def recipes() -> dict[str, str]:
    """The recipe blocks, keyed by the library that opens the paragraph before each."""
    section = USAGE.read_text().split("### Recipes: the models' own parameters")[1]
    section = re.split(r"\n#{1,3} ", section)[0]  # up to the next heading
    out = {}
    for match in re.finditer(r"```python\n(.*?)```", section, re.S):
        intro = section[: match.start()].strip().split("\n\n")[-1]
        out[next(lib for lib in LIBRARIES if intro.startswith(lib))] = match.group(1)
    return out


def run_recipe(library: str, seed: int, **names) -> dict:
    scope = {"torch": torch, "patch_embed": patch_embed, "B": B, "N": N, **names}
    torch.manual_seed(seed)  # the draw the model makes after the same seed
    exec(recipes()[library], scope)  # noqa: S102 - the page's own code
    return scope


def test_every_library_has_a_recipe() -> None:
    assert sorted(recipes()) == sorted(LIBRARIES)


def test_mae_recipe() -> None:
    transformers = pytest.importorskip("transformers", reason="a test extra")
    config = transformers.ViTMAEConfig(hidden_size=32, image_size=32, patch_size=8,
                                       num_hidden_layers=0, num_attention_heads=2)  # fmt: skip
    model = randomise(transformers.ViTMAEModel(config))
    x = torch.randn(B, 3, 32, 32)
    torch.manual_seed(1)
    tokens, mask, ids_restore = model.embeddings(x)
    got = run_recipe("MAE", 1, model=model, x=x)
    assert tokens.shape == (B, 1 + 4, 32)
    torch.testing.assert_close(got["tokens"], tokens, **TOL)
    assert torch.equal(got["mask"], mask) and torch.equal(got["ids_restore"], ids_restore)


def test_videomae_recipe() -> None:
    transformers = pytest.importorskip("transformers", reason="a test extra")
    config = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4,
                                         tubelet_size=2, hidden_size=32, num_hidden_layers=0,
                                         num_attention_heads=2)  # fmt: skip
    model = randomise(transformers.VideoMAEModel(config))
    pixel_values = torch.randn(B, 4, 3, 32, 32)
    visible = torch.rand(B, N).argsort(1)[:, :3]  # a tube mask: 3 positions shown per frame
    shown = torch.zeros(B, N, dtype=torch.bool).scatter_(1, visible, True)
    bool_masked_pos = (~shown).repeat(1, 2)
    expected = model.embeddings(pixel_values, bool_masked_pos)
    got = run_recipe("VideoMAE", 0, model=model, pixel_values=pixel_values,
                     bool_masked_pos=bool_masked_pos)  # fmt: skip
    assert expected.shape == (B, 6, 32)
    torch.testing.assert_close(got["tokens"], expected, **TOL)


def test_timm_patch_dropout_recipe() -> None:
    vision_transformer = pytest.importorskip(
        "timm.models.vision_transformer", reason="a test extra"
    )
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=0, num_heads=2)
    model = vision_transformer.VisionTransformer(**args, patch_drop_rate=0.5)
    model = randomise(model).train()
    x = torch.randn(B, 3, 32, 32)
    torch.manual_seed(2)
    expected = model.patch_drop(model._pos_embed(model.patch_embed(x)))
    got = run_recipe("timm", 2, model=model, x=x)
    assert expected.shape == (B, 1 + 8, 32)
    torch.testing.assert_close(got["tokens"], expected, **TOL)


def test_open_clip_patch_dropout_recipe() -> None:
    transformer = pytest.importorskip("open_clip.transformer", reason="a test extra")
    visual = transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=0,
                                           heads=2, mlp_ratio=2.0, patch_dropout=0.5)  # fmt: skip
    visual = randomise(visual).train()
    x = torch.randn(B, 3, 32, 32)
    torch.manual_seed(3)
    expected = visual._embeds(x)
    got = run_recipe("OpenCLIP", 3, model=SimpleNamespace(visual=visual), x=x)
    assert expected.shape == (B, 1 + 8, 32)
    torch.testing.assert_close(got["tokens"], expected, **TOL)
