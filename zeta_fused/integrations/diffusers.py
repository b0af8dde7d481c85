"""diffusers: whole stem of ``PatchEmbed`` (DiT, PixArt-alpha/sigma, SD3): the patch conv, the
optional LayerNorm (no affine, eps 1e-6) and the sincos position table as one fused call.

The table is the one the peer adds for that input: its buffer, the SD3 centre crop of it
(``pos_embed_max_size``, through the peer's own ``cropped_pos_embed``), or the table the peer
computes again for another latent size (PixArt's ``interpolation_scale``) with diffusers' own
``get_2d_sincos_pos_embed``. Anything else runs the peer's forward.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from .. import dispatch
from ..functional import fused_dtypes
from ..nn.norms import norm_problem, norm_value
from ..nn.params import param
from ..op.args import Stem
from ._base import FusedStem, StemKind, conv_stem, swapper
from .convs import patch_conv_problem

_EMBEDDINGS = "diffusers.models.embeddings"


def _peer(name: str):
    """A diffusers object if diffusers' embeddings module is imported already."""
    return getattr(sys.modules.get(_EMBEDDINGS), name, None)


def _norm(m: nn.Module) -> nn.Module | None | bool:
    """The norm the peer applies (None: none), or False when it is not one over the embedding
    dim that the op computes."""
    if not m.layer_norm:
        return None
    return m.norm if norm_problem(m.norm, m.proj.out_channels) is None else False


class _FusedDiffusersPatchEmbed(FusedStem):
    """diffusers ``PatchEmbed`` with projection, LayerNorm and position table fused."""

    def _zeta_table(self, latent: Tensor, grid: tuple[int, int]) -> Tensor | None:
        """The (1, N, D) table the peer adds to this latent's tokens; None: it adds none."""
        if self.pos_embed is None:
            return None
        if self.pos_embed_max_size:
            return self.cropped_pos_embed(*latent.shape[-2:])  # raises the peer's errors
        if (self.height, self.width) == grid:
            return self.pos_embed
        # The sincos table of this size, computed on every call as the peer does (a cache
        # would hand a table made under inference_mode to a training call).
        return _peer("get_2d_sincos_pos_embed")(
            embed_dim=self.pos_embed.shape[-1], grid_size=grid, base_size=self.base_size,
            interpolation_scale=self.interpolation_scale, device=latent.device, output_type="pt",
        ).float().unsqueeze(0)  # fmt: skip

    def try_fused(self, latent: Tensor) -> Tensor | None:
        """The fused (B, N, D) tokens, or None: the peer's forward runs."""
        conv = self.proj
        norm = _norm(self)
        if (
            norm is False
            or not self.flatten
            or latent.ndim != 4
            or tuple(conv.kernel_size) != (self.patch_size,) * 2  # the peer's grid is in these
            or patch_conv_problem(conv) is not None
            or not self.zeta_fusable(latent, conv, *([] if norm is None else [norm]))
        ):
            return None
        grid = (latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size)
        table = self._zeta_table(latent, grid)
        dim = conv.out_channels
        if table is not None and table.shape != (1, grid[0] * grid[1], dim):
            return None  # the peer's add would not broadcast: its own error
        # The peer adds the (fp32) table to tokens of this dtype, then casts back to it.
        token_dtype = fused_dtypes(latent, param(conv, "weight"), norm is not None)[1]
        if table is not None and not torch.is_autocast_enabled(latent.device.type):
            table = table.to(token_dtype)  # the op takes one dtype outside autocast
        pos = None if table is None else table[0]
        post = norm_value(norm, latent.dtype)
        y = conv_stem(latent, conv, lambda _: Stem(pos, None, None), post)
        return None if y is None else y.to(token_dtype)

    @dispatch.traced_as_peer
    def forward(self, latent: Tensor) -> Tensor:
        tokens = self.try_fused(latent)
        return super().forward(latent) if tokens is None else tokens


def _problem(m: nn.Module) -> str | None:
    if type(m).forward is not _peer("PatchEmbed").forward:
        return f"{type(m).__name__} overrides PatchEmbed.forward"
    if not m.flatten:
        return "flatten=False: it returns the conv's (B, D, H, W) map, not tokens"
    why = patch_conv_problem(m.proj)
    if why:
        return why
    if tuple(m.proj.kernel_size) != (m.patch_size,) * 2:
        return f"conv kernel {tuple(m.proj.kernel_size)} != patch_size {m.patch_size}"
    if _norm(m) is False:
        return f"norm is {type(m.norm).__name__}, not a LayerNorm over the embedding dim"
    return None


def _matches(m: nn.Module) -> bool:
    cls = _peer("PatchEmbed")
    return cls is not None and isinstance(m, cls)


STEM_KINDS = (
    StemKind("diffusers PatchEmbed", _matches, _problem, swapper(_FusedDiffusersPatchEmbed)),
)
