"""Fused forwards check, on every call, each child and method they do the work of (docs/design.md,
"Drop-in rule"): one changed after conversion (a module with a forward of its own set in a
child's place, a forward set on a child's instance as accelerate's device hooks and monkeypatches
do, a method set on the instance) makes the call run the peer's code, which calls it. Each case
against the unconverted model changed the same way."""

from __future__ import annotations

import copy

import pytest
import torch
from peers import PEERS, converted, first_tensor
from torch import nn

TOL = {"rtol": 1e-4, "atol": 1e-5}


def same_outputs(model: nn.Module, before: nn.Module, inputs: tuple, **kw) -> None:
    """``model`` and ``before`` give the same main output from the same seed."""
    outputs = []
    for m in (model, before):
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append(first_tensor(m(*inputs, **kw)))
    torch.testing.assert_close(*outputs, **TOL)


def on_both(model: nn.Module, before: nn.Module, change) -> None:
    for m in (model, before):
        change(m)


# The children each fused forward does the work of (calls otherwise, or not at all).
SKIPPED_CHILDREN = {
    "timm_vit": ["patch_embed", "patch_embed.proj", "norm_pre"],
    "timm_patch_embed": ["patch_embed.proj"],
    "hf_vit": ["embeddings.patch_embeddings", "embeddings.patch_embeddings.projection"],
    "hf_dinov2_registers": ["embeddings.patch_embeddings",
                            "embeddings.patch_embeddings.projection"],
    "hf_clip": ["embeddings", "embeddings.patch_embedding", "pre_layrnorm"],
    "hf_siglip2": ["embeddings.patch_embedding"],
    "hf_aimv2": ["embeddings.patch_embed", "embeddings.rms_norm"],
    "hf_vit_mae": ["embeddings.patch_embeddings", "embeddings.patch_embeddings.projection"],
    "hf_video_mae": ["embeddings.patch_embeddings", "embeddings.patch_embeddings.projection"],
    "vit_pytorch_vit": ["to_patch_embedding", "to_patch_embedding.1", "to_patch_embedding.2",
                        "to_patch_embedding.3"],
    "open_clip": ["conv1", "ln_pre"],
    "segment_anything": ["patch_embed", "patch_embed.proj"],
    "diffusers": ["proj", "norm"],
}  # fmt: skip
CASES = [(name, child) for name, children in SKIPPED_CHILDREN.items() for child in children]


def squared_on_the_instance(module: nn.Module) -> None:
    """Gives ``module`` a forward of its own on the instance, wrapping the one it had (as
    accelerate's hooks do): its output squared (a change no norm after it undoes)."""
    real = module.forward
    module.forward = lambda *args, **kwargs: real(*args, **kwargs).square()


@pytest.mark.parametrize(("name", "child"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_a_forward_set_on_a_child_instance_runs(name, child, device) -> None:
    model, before, inputs = converted(name, "triton", device)
    on_both(model, before, lambda m: squared_on_the_instance(m.get_submodule(child)))
    same_outputs(model, before, inputs)


def test_siglip2_lora_linear_set_after_conversion(device, fused_path_calls) -> None:
    """A LoRA-style subclass of nn.Linear (its own forward) in place of the patch Linear."""

    class LoRALinear(nn.Linear):
        def __init__(self, base: nn.Linear, rank: int = 2):
            super().__init__(base.in_features, base.out_features, device=base.weight.device)
            self.load_state_dict(base.state_dict())
            self.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
            self.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + self.up(self.down(x))

    model, before, inputs = converted("hf_siglip2", "triton", device)
    lora = LoRALinear(model.embeddings.patch_embedding)
    on_both(model, before, lambda m: setattr(m.embeddings, "patch_embedding", copy.deepcopy(lora)))
    same_outputs(model, before, inputs)
    assert fused_path_calls == []


class Squared(nn.Module):
    """A patch module with a forward of its own around the peer's: its tokens squared."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.num_channels = inner.num_channels

    @property
    def projection(self) -> nn.Module:  # ViTModel reads its dtype
        return self.inner.projection

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.inner(*args, **kwargs).square()


@pytest.mark.parametrize("name", ["hf_vit", "hf_vit_mae", "hf_video_mae"])
def test_patch_module_with_its_own_forward_swapped_in(name, device) -> None:
    model, before, inputs = converted(name, "triton", device)
    squared = Squared(model.embeddings.patch_embeddings)
    on_both(model, before, lambda m: setattr(m.embeddings, "patch_embeddings",
                                             copy.deepcopy(squared)))  # fmt: skip
    same_outputs(model, before, inputs)


def test_vit_mae_random_masking_set_on_the_instance(device) -> None:
    """The method receives the tokens (the peer's call), not the patch indices."""
    model, before, inputs = converted("hf_vit_mae", "triton", device)

    def scaling_masking(embeddings: nn.Module):
        real = embeddings.random_masking
        embeddings.random_masking = lambda sequence, noise=None: real(sequence.square(), noise)

    on_both(model, before, lambda m: scaling_masking(m.embeddings))
    same_outputs(model, before, inputs)


def test_vit_interpolation_set_on_the_instance(device) -> None:
    """``interpolate_pos_encoding`` set on the instance reads the tokens it is given (the peer
    gives it the embeddings; the fused forward a stand-in of their shape)."""
    model, before, _ = converted("hf_vit", "triton", device)

    def reading_tokens(embeddings: nn.Module):
        real = embeddings.interpolate_pos_encoding
        embeddings.interpolate_pos_encoding = lambda tokens, h, w: (
            real(tokens, h, w) + tokens.mean(0, keepdim=True)
        )

    on_both(model, before, lambda m: reading_tokens(m.embeddings))
    x = torch.randn(2, 3, 24, 16, device=device)
    same_outputs(model, before, (x,), interpolate_pos_encoding=True)


def test_timm_pos_embed_set_on_the_instance(device) -> None:
    model, before, inputs = converted("timm_vit", "triton", device)

    def squared_pos_embed(vit: nn.Module):
        real = vit._pos_embed
        vit._pos_embed = lambda x: real(x).square()

    on_both(model, before, squared_pos_embed)
    same_outputs(model, before, inputs)


def test_vit_pytorch_sequential_with_its_own_forward() -> None:
    """A to_patch_embedding Sequential subclass with its own forward is not fused."""
    pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    from zeta_fused import fuse_stems

    class Scaled(nn.Sequential):
        def forward(self, x):
            return super().forward(x).square()

    model = PEERS["vit_pytorch_vit"].make()
    model.to_patch_embedding = Scaled(*model.to_patch_embedding)
    summary = fuse_stems(model, backend="triton")
    reasons = dict(summary.skipped)
    assert "has a forward of its own" in reasons[""], str(summary)
