"""Conv-projection stems of any rank, as the models run them, for the benchmark's "conv"
presets (videos, latents, sequences, rows already cut):

- ``conv``: the peer's own module, a ConvNd with kernel = stride (VideoMAE permutes its
  (B, T, C, H, W) input first; Qwen2.5-VL views its rows as tubelets);
- ``linear``: the reshape + ``F.linear`` rewrite that vLLM (``Conv3dLayer``) and transformers
  (``fusion_config={"patch_embeddings": True}``) use instead of the conv;
- ``fused``: the peer's module with its conv converted to the fused one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .presets import ConvPreset

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConvStem(nn.Module):
    """The peer's own projection (see the module docstring)."""

    def __init__(self, p: ConvPreset) -> None:
        super().__init__()
        conv = CONVS[len(p.patch)]
        self.proj = conv(p.channels, p.dim, kernel_size=p.patch, stride=p.patch, bias=p.bias)
        self.layout, self.patch, self.channels = p.layout, p.patch, p.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "rows":
            return self.proj(x.view(-1, self.channels, *self.patch)).view(x.shape[0], -1)
        if self.layout == "frames_first":
            x = x.permute(0, 2, 1, 3, 4)
        return self.proj(x).flatten(2).transpose(1, 2)


class LinearStem(ConvStem):
    """The same projection as a GEMM on patches gathered by reshape and permute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight.flatten(1)  # (D, C * prod(patch)) in (c, *patch) order
        if self.layout == "rows":
            return torch.nn.functional.linear(x, w, self.proj.bias)
        if self.layout == "frames_first":
            x = x.permute(0, 2, 1, 3, 4)
        batch, chans, nd = x.shape[0], x.shape[1], len(self.patch)
        grid = [s // p for s, p in zip(x.shape[2:], self.patch, strict=True)]
        split = [n for g, p in zip(grid, self.patch, strict=True) for n in (g, p)]
        x = x.reshape(batch, chans, *split)
        order = [0, *range(2, 2 + 2 * nd, 2), 1, *range(3, 3 + 2 * nd, 2)]
        patches = x.permute(order).reshape(batch, math.prod(grid), -1)
        return torch.nn.functional.linear(patches, w, self.proj.bias)


def fused(p: ConvPreset, backend: str = "triton") -> nn.Module:
    from zeta_fused.integrations.convs import fuse_conv

    stem = ConvStem(p)
    fuse_conv(stem.proj, backend)
    return stem


def make_input(p: ConvPreset, device: str, mode: str) -> torch.Tensor:
    if p.layout == "rows":
        shape = (p.batch, p.patch_dim)
    elif p.layout == "frames_first":
        shape = (p.batch, p.spatial[0], p.channels, *p.spatial[1:])
    else:
        shape = (p.batch, p.channels, *p.spatial)
    x = torch.randn(shape, device=device, dtype=p.torch_dtype)
    return x.requires_grad_(mode == "train_x")
