"""transformers: whole stems of masked pretraining models, which embed only the patches they
keep: ``ViTMAEEmbeddings`` (``ViTMAEModel``, ``ViTMAEForPreTraining``), as one call of the fused
op over the kept patches (docs/design.md, "Token subsets"); the peer embeds every patch, then
selects.

ViTMAE draws which patches to keep in its ``random_masking``; the fused forward makes the same
draw and runs that very method on the patch indices instead of the tokens, so the kept patches,
``mask`` and ``ids_restore`` are the peer's own (``noise`` honoured). Whatever a call does that
the op does not runs the peer's forward, as in ``transformers``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.params import param
from ._base import StemKind, overrides
from .transformers import (
    Rows,
    _embeddings_kind,
    _first_rows,
    _FusedHFEmbeddings,
    _stand_in,
    hf_class,
)

# --- ViTMAE ---------------------------------------------------------------------------------

_VIT_MAE = "vit_mae.modeling_vit_mae"


class _FusedViTMAEEmbeddings(_FusedHFEmbeddings):
    """transformers ``ViTMAEEmbeddings``: the kept patches (the peer's ``random_masking``) with
    their table rows, after the class row ``cls_token + table[0]``; returns the peer's
    ``(embeddings, mask, ids_restore)``."""

    def forward(self, pixel_values: Tensor, noise: Tensor | None = None,
                interpolate_pos_encoding: bool = False, *args, **kwargs):  # fmt: skip
        out = None
        patches = self.patch_embeddings
        drawn: list[Tensor] = []  # the noise drawn here, should the peer's forward run after all
        sized = tuple(pixel_values.shape[-2:]) == tuple(self.image_size)
        if (
            not args
            and not kwargs
            and (interpolate_pos_encoding or sized)  # else the peer raises its error
            and pixel_values.ndim == 4
            and pixel_values.shape[1] == patches.num_channels
        ):
            out = self._zeta_masked(pixel_values, noise, interpolate_pos_encoding, drawn)
        if out is None:
            noise = drawn[0] if drawn else noise
            return super().forward(pixel_values, noise, interpolate_pos_encoding, *args, **kwargs)
        return out

    def _zeta_masked(self, x: Tensor, noise: Tensor | None, interpolate: bool,
                     drawn: list[Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:  # fmt: skip
        """The fused ``(embeddings, mask, ids_restore)``, or None: the peer's forward runs (with
        the noise in ``drawn`` when this drew it)."""
        conv = self.patch_embeddings.projection
        batch, dim = x.shape[0], conv.out_channels
        grid = [s // p for s, p in zip(x.shape[2:], conv.kernel_size, strict=True)]
        if noise is not None and tuple(noise.shape) != (batch, math.prod(grid)):
            return None  # the peer's random_masking decides what such noise means
        masking = []

        def rows(tokens: int) -> Rows:
            table = param(self, "position_embeddings")
            if interpolate:  # the peer hands its method the patch tokens alone
                table = self.interpolate_pos_encoding(_stand_in(x, tokens, dim), *x.shape[-2:])
            return _first_rows(table, tokens, param(self, "cls_token").flatten(0, 1), 1)

        def keep(grid: tuple[int, ...]) -> Tensor:
            tokens = math.prod(grid)
            if noise is None:  # the peer's draw (random_masking's own, for its sequence)
                drawn.append(torch.rand(batch, tokens, device=x.device))
            # The peer's random_masking selects from its sequence: given the patch indices
            # instead of the tokens, it selects the indices of the patches it keeps.
            indices = torch.arange(tokens, device=x.device).expand(batch, tokens).unsqueeze(-1)
            kept, mask, ids_restore = self.random_masking(indices, drawn[0] if drawn else noise)
            masking.extend((mask, ids_restore))
            return kept.squeeze(-1)

        patches = self.patch_embeddings
        y = self._zeta_rows(x, conv, (patches, conv), rows, keep=keep)
        return None if y is None else (y, *masking)


def _vit_mae_problem(m: nn.Module) -> str | None:
    own_masking = overrides(m, hf_class(type(m), _VIT_MAE, "ViTMAEEmbeddings"), "random_masking")
    return own_masking or _vit_mae_kind.problem(m)


_vit_mae_kind = _embeddings_kind(_VIT_MAE, "ViTMAEEmbeddings", _FusedViTMAEEmbeddings,
                                 "ViTMAEPatchEmbeddings")  # fmt: skip

STEM_KINDS = (
    StemKind("transformers ViTMAEEmbeddings", _vit_mae_kind.matches, _vit_mae_problem,
             _vit_mae_kind.convert),
)  # fmt: skip
