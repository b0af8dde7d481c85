"""The implementations compared by the benchmark, each built for one preset and one mode.

A provider builds a zero-argument ``step`` callable for a (preset, mode): ``fwd`` is inference
under ``no_grad``; ``train`` is forward+backward with parameter gradients; ``train_x`` also needs
the image gradient. Building may raise: the benchmark then shows the provider as failed with
the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops.layers.torch import Rearrange
from torch import nn

from zeta_fused import PatchEmbeddings
from zeta_fused.op.reference import PATCHIFY

from . import conv_stems, model_stems, subset_stems
from .presets import Preset

Step = Callable[[], object]


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Preset, str, str], tuple[nn.Module, Step]]
    needs_cuda: bool = False
    note: str = ""


def _vit_sequential(p: Preset) -> nn.Module:
    """vit-pytorch's ``to_patch_embedding``, written out."""
    return nn.Sequential(
        Rearrange(PATCHIFY, p1=p.patch[0], p2=p.patch[1]),
        nn.LayerNorm(p.patch_dim),
        nn.Linear(p.patch_dim, p.dim),
        nn.LayerNorm(p.dim),
    )


class _ConvStem(nn.Module):
    """timm's PatchEmbed math (Conv2d kernel = stride = patch, flatten to NLC, LayerNorm)."""

    def __init__(self, p: Preset) -> None:
        super().__init__()
        self.proj = nn.Conv2d(p.channels, p.dim, kernel_size=p.patch, stride=p.patch)
        self.norm = nn.LayerNorm(p.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _timm_stem(p: Preset) -> nn.Module:
    try:
        from timm.layers import PatchEmbed
    except ImportError:
        return _ConvStem(p)
    return PatchEmbed(
        img_size=(p.height, p.width),
        patch_size=p.patch,
        in_chans=p.channels,
        embed_dim=p.dim,
        norm_layer=nn.LayerNorm,
    )


def make_input(p: Preset, device: str, mode: str, channels_last: bool = False) -> torch.Tensor:
    if p.family in ("conv", "subset"):  # any rank, VideoMAE's (B, T, C, H, W) layout
        return conv_stems.make_input(p, device, mode)
    x = torch.randn(p.batch, p.channels, p.height, p.width, device=device, dtype=p.torch_dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(mode == "train_x")


def make_step(model: nn.Module, x: torch.Tensor, mode: str) -> Step:
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return model(x)

        return step
    dy = None

    def step():
        nonlocal dy
        y = model(x)
        if dy is None:
            dy = torch.randn_like(y)
        y.backward(dy)

    return step


# Preset families whose peer is the model's own convolution.
PEER_CONVS = ("conv", "stem", "subset")


def _module_provider(factory, channels_last=False, compile_mode=None, cudnn_benchmark=False):
    def build(p: Preset, device: str, mode: str):
        # As a timm user trains: cuDNN picks its fastest convolution ("conv": for the conv and
        # whole-stem presets only, whose peers are convolutions).
        if cudnn_benchmark is True or (cudnn_benchmark == "conv" and p.family in PEER_CONVS):
            # (global and left on: it concerns convolutions only, which only these peers run)
            torch.backends.cudnn.benchmark = True
        model = factory(p).to(device, p.torch_dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile_mode is not None:
            # Fresh and static, as a user compiling for one input size: without the reset,
            # dynamo would see the Sequential's forward again at a new size and compile a
            # dynamic-shape graph (or, past its recompile limit, fall back to eager).
            torch._dynamo.reset()
            model = torch.compile(model, mode=compile_mode, dynamic=False)
        return model, make_step(model, make_input(p, device, mode, channels_last), mode)

    return build


def _timm_vit(fused: bool):
    """timm ViT-B/16 (random weights) at the preset's size, optionally with the fused stem."""

    def factory(p: Preset) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=(p.height, p.width),
            patch_size=p.patch,
            in_chans=p.channels,
            embed_dim=p.dim,
            depth=12,
            num_heads=12,
        )
        if fused:
            from zeta_fused import fuse_patch_embeddings

            summary = fuse_patch_embeddings(model, backend="triton")
            if not summary.converted:
                raise RuntimeError(f"nothing converted: {summary}")
        return model

    return factory


def _zeta(backend: str):
    def factory(p: Preset) -> nn.Module:
        if p.family == "conv":  # the model's own stem with its conv converted
            return conv_stems.fused(p, backend)
        if p.family == "stem":  # the model's own parameters straight into the fused op
            return model_stems.fused(p, backend)
        if p.family == "subset":  # the same, with the model's kept patches
            return subset_stems.fused(p, backend)
        return PatchEmbeddings(p.channels, p.dim, patch_size=p.patch, backend=backend)

    return factory


def _peer(factory):
    """The image presets' peer, or for a conv, whole-stem or subset preset the model's own
    stem."""
    own = {"conv": conv_stems.ConvStem, "stem": model_stems.peer, "subset": subset_stems.peer}
    return lambda p: own.get(p.family, factory)(p)


PROVIDERS = {
    pr.name: pr
    for pr in [
        Provider("zeta-fused", _module_provider(_zeta("triton")), needs_cuda=True),
        Provider("zeta-eager", _module_provider(_zeta("eager"))),
        Provider(
            "eager",
            _module_provider(_peer(_vit_sequential), cudnn_benchmark="conv"),
            note="vit-pytorch Sequential (conv, stem, subset presets: the model's own)",
        ),
        Provider(
            "compile",
            _module_provider(
                _peer(_vit_sequential), compile_mode="default", cudnn_benchmark="conv"
            ),
        ),
        Provider(
            "linear-rewrite",
            _module_provider(conv_stems.LinearStem),
            note="reshape + F.linear (vLLM, transformers)",
        ),
        Provider(
            "compile-max-autotune",
            _module_provider(_vit_sequential, compile_mode="max-autotune-no-cudagraphs"),
        ),
        Provider(
            "timm-conv",
            _module_provider(_timm_stem, cudnn_benchmark=True),
            note="no pre-norm, cudnn.benchmark",
        ),
        Provider(
            "timm-conv-cl",
            _module_provider(_timm_stem, channels_last=True, cudnn_benchmark=True),
            note="no pre-norm, cudnn.benchmark",
        ),
        Provider(
            "timm-vit-fused",
            _module_provider(_timm_vit(True), cudnn_benchmark=True),
            needs_cuda=True,
            note="fuse_patch_embeddings",
        ),
        Provider("timm-vit", _module_provider(_timm_vit(False), cudnn_benchmark=True)),
    ]
}
FUSED = "zeta-fused"
EAGER = "eager"  # the peak-memory reference: the vit-pytorch Sequential
E2E = ["timm-vit-fused", "timm-vit"]
# The conv presets' providers: the fused conv, the model's conv, its compile, the GEMM rewrite.
CONV = ["zeta-fused", "eager", "linear-rewrite", "compile"]
# The whole-stem and subset presets' providers: the fused op on the model's parameters, the
# model's own stem (a subset preset's: embed everything, then gather) and its torch.compile.
STEM = ["zeta-fused", "eager", "compile"]
GPU_DEFAULT = ["zeta-fused", "zeta-eager", "eager", "compile", "timm-conv", "timm-conv-cl"]
CPU_DEFAULT = ["zeta-eager", "eager", "timm-conv", "timm-conv-cl"]
