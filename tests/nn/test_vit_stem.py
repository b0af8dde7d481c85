"""``ViTStem``, the whole stem for new models: fused equals its own eager path (the submodules
one by one) within the accuracy rule, forward and every gradient; hooks and errors."""

from __future__ import annotations

import pytest
import torch
from support import compare, randomise

from zeta_fused import ViTStem

CONFIGS = {
    "cls + pos": {},
    "cls + 4 registers, every norm": {
        "num_prefix_tokens": 5,
        "pre_norm": True,
        "post_norm": True,
        "stem_norm": True,
    },  # fmt: skip
    "no prefix, stem norm": {"num_prefix_tokens": 0, "stem_norm": True},
    "prefix without table": {"pos_embed": False, "post_norm": True, "bias": False},
}


def stem(**kw) -> ViTStem:
    return randomise(ViTStem(3, 40, (16, 8), 4, **kw), 0.2).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_matches_eager(name, dtype, device, fused_path_calls) -> None:
    compare(stem(**CONFIGS[name]), torch.randn(2, 3, 16, 8), dtype, device)
    assert fused_path_calls, "the fused path did not run"


def test_shapes_keys_and_errors(device) -> None:
    m = stem(num_prefix_tokens=2, stem_norm=True).float().to(device)
    y = m(torch.randn(3, 3, 16, 8, device=device))
    assert y.shape == (3, 2 + 8, 40)
    assert set(m.state_dict()) == {
        "patches.embedding.2.weight", "patches.embedding.2.bias", "prefix_tokens", "pos_embed",
        "norm.weight", "norm.bias",
    }  # fmt: skip
    with pytest.raises(
        ValueError, match=r"gives a 2x2 patch grid, but the position table is for 4x2"
    ):
        m(torch.randn(1, 3, 8, 8, device=device))
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        ViTStem(3, 8, 18, 4)


def test_hooks_run_the_submodules(device, fused_path_calls) -> None:
    m = stem(stem_norm=True).float().to(device)
    m.backend = "triton"
    x = torch.randn(2, 3, 16, 8, device=device)
    expected = m(x)
    assert fused_path_calls == [1]
    seen = []
    handle = m.norm.register_forward_hook(lambda mod, i, o: seen.append(i[0].shape))
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    assert seen == [(2, 9, 40)]  # the norm ran itself: its hook saw its input
    # the patch embedding alone still ran fused
    assert fused_path_calls == [1, 1]
    handle.remove()
    for module in (m.patches, m.patches.embedding, m.patches.embedding[2]):
        seen.clear()
        handle = module.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
        assert seen == [(2, 8, 40)], module  # the patch tokens, as the eager path makes them
        handle.remove()


def test_compile_fullgraph(device, fused_calls) -> None:
    torch._dynamo.reset()
    m = stem(num_prefix_tokens=1, stem_norm=True).float().to(device)
    m.backend = "triton"
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, 8, device=device)
    y = compiled(x)
    assert fused_calls
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_replaced_patch_layers_run_eager(device, fused_path_calls) -> None:
    m = stem(stem_norm=True).float().to(device)
    m.backend = "triton"
    x = torch.randn(2, 3, 16, 8, device=device)
    expected = m(x)
    m.patches.embedding = torch.nn.Sequential(*m.patches.embedding)  # a plain Sequential
    fused_path_calls.clear()
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    assert fused_path_calls == []
