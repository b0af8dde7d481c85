"""Models pickled by earlier builds of zeta-fused 0.1.0.dev0 still load: before the package was
split into ``op``, ``nn`` and ``integrations`` (tests/data/pickles_0.1.0.dev0), and before the
hand-off classes took public names (tests/data/pickles_28f856d). Their fused classes and
functions are found where they live now, and they give the output they gave then, eager and
fused."""

from __future__ import annotations

import pytest
import torch
from support import TESTS

from zeta_fused import fuse_patch_embeddings, fuse_stems

PICKLES = sorted((TESTS / "data").glob("pickles_*/*.pt"))
# Loading needs the peer library each model comes from.
PEERS = {"timm": "timm", "hf": "transformers", "vit": "vit_pytorch", "diffusers": "diffusers",
         "open": "open_clip"}  # fmt: skip
# Converted by fuse_patch_embeddings; the others by fuse_stems.
PATCH_EMBEDDINGS_ONLY = {"timm_vit_patch_embed"}


def _output(y):
    return getattr(y, "last_hidden_state", y)


@pytest.mark.parametrize("path", PICKLES, ids=[p.stem for p in PICKLES])
def test_a_model_pickled_by_an_earlier_build_loads_and_runs(path, device, fused_path_calls) -> None:
    peer = PEERS.get(path.stem.split("_")[0])
    if peer is not None:
        pytest.importorskip(peer)
    saved = torch.load(path, weights_only=False)
    model, x, y = saved["model"], saved["input"], saved["output"]
    with torch.no_grad():
        torch.testing.assert_close(_output(model(x)), y)
        # Converting again finds everything fused already (and sets the backend).
        convert = fuse_patch_embeddings if path.stem in PATCH_EMBEDDINGS_ONLY else fuse_stems
        summary = convert(model, backend="triton")
        assert summary.already_fused and not summary.converted, str(summary)
        model.to(device)
        fused = _output(model(x.to(device))).cpu()
    assert fused_path_calls, "the loaded model did not run the fused op"
    torch.testing.assert_close(fused, y, rtol=1e-4, atol=1e-5)
