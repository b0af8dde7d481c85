"""transformers: whole stems of masked pretraining models, which embed only the patches they
keep: ``ViTMAEEmbeddings`` (``ViTMAEModel``, ``ViTMAEForPreTraining``) and ``VideoMAEEmbeddings``
(``VideoMAEModel``, ``VideoMAEForPreTraining``), each as one call of the fused op over the kept
patches (docs/design.md, "Token subsets"); the peer embeds every patch, then selects.

ViTMAE draws which patches to keep in its ``random_masking``; the fused forward makes the same
draw and runs that very method on the patch indices instead of the tokens, so the kept patches,
``mask`` and ``ids_restore`` are the peer's own (``noise`` honoured). VideoMAE keeps the patches
``bool_masked_pos`` leaves visible, in grid order. Whatever a call does that the op does not
runs the peer's forward, as in ``transformers``; what they share is in ``_hf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import dispatch
from ..functional import fused_dtypes
from ..nn.params import param
from ..op.args import Stem
from . import _hf
from ._base import StemKind, conv_stem, swap
from .convs import patch_conv_problem, patch_grid

# --- ViTMAE ---------------------------------------------------------------------------------

_VIT_MAE = "vit_mae.modeling_vit_mae"


class _FusedViTMAEEmbeddings(_hf.FusedEmbeddings):
    """transformers ``ViTMAEEmbeddings``: the kept patches (the peer's ``random_masking``) with
    their table rows, after the class row ``cls_token + table[0]``; returns the peer's
    ``(embeddings, mask, ids_restore)``."""

    _zeta_patches = (_VIT_MAE, "ViTMAEPatchEmbeddings")
    _zeta_replaced = ("interpolate_pos_encoding", "random_masking")

    @dispatch.traced_as_peer
    def forward(self, pixel_values: Tensor, noise: Tensor | None = None,
                interpolate_pos_encoding: bool = False, *args, **kwargs):  # fmt: skip
        out = None
        drawn: list[Tensor] = []  # the noise drawn here, should the peer's forward run after all
        sized = tuple(pixel_values.shape[-2:]) == tuple(self.image_size)
        if (
            not args
            and not kwargs
            and (interpolate_pos_encoding or sized)  # else the peer raises its error
            and pixel_values.ndim == 4
            and self._zeta_untouched()
            and pixel_values.shape[1] == self.patch_embeddings.num_channels
        ):
            out = self.try_fused(pixel_values, noise, interpolate_pos_encoding, drawn)
        if out is None:
            noise = drawn[0] if drawn else noise
            return super().forward(pixel_values, noise, interpolate_pos_encoding, *args, **kwargs)
        return out

    def try_fused(self, x: Tensor, noise: Tensor | None, interpolate: bool,
                  drawn: list[Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:  # fmt: skip
        """The fused ``(embeddings, mask, ids_restore)``, or None: the peer's forward runs (with
        the noise in ``drawn`` when this drew it)."""
        conv = self.patch_embeddings.projection
        batch, dim = x.shape[0], conv.out_channels
        grid = patch_grid(x, conv.kernel_size)
        if noise is not None and tuple(noise.shape) != (batch, math.prod(grid)):
            return None  # the peer's random_masking decides what such noise means
        masking = []

        def rows(tokens: int) -> _hf.Rows:
            table = param(self, "position_embeddings")
            if interpolate:  # the peer hands its method the patch tokens alone
                table = self.interpolate_pos_encoding(_hf.stand_in(x, tokens, dim), *x.shape[-2:])
            return _hf.first_rows(table, tokens, param(self, "cls_token").flatten(0, 1), 1)

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
        y = _hf.fused_rows(self, x, conv, (patches, conv), rows, keep=keep)
        return None if y is None else (y, *masking)


_vit_mae_kind = _hf.embeddings_kind(_VIT_MAE, "ViTMAEEmbeddings", _FusedViTMAEEmbeddings)

# --- VideoMAE -------------------------------------------------------------------------------

_VIDEO_MAE = "videomae.modeling_videomae"


def _visible_patches(bool_masked_pos: Tensor, x: Tensor) -> Tensor:
    """(B, L) indices of the patches ``bool_masked_pos`` leaves visible, in grid order, on the
    video's device; raises when their number differs between videos (the peer's reshape to
    (B, -1, D) would fail, or mix the videos' tokens when the total divides evenly)."""
    visible = ~bool_masked_pos
    counts = visible.sum(1)
    if bool(counts.ne(counts[0]).any()):
        raise RuntimeError(
            f"VideoMAEEmbeddings: bool_masked_pos leaves {counts.tolist()} patches visible in "
            f"the {len(counts)} videos of the batch; the visible tokens are reshaped to "
            f"(batch, -1, hidden_size), which needs the same number in every video"
        )
    return visible.nonzero()[:, 1].view(visible.shape[0], -1).to(x.device)


class _FusedVideoMAEEmbeddings(_hf.FusedEmbeddings):
    """transformers ``VideoMAEEmbeddings``: tubelets of the (B, T, C, H, W) video (read in
    place) + the fixed sincos table, only the visible tubelets (``~bool_masked_pos``)."""

    _zeta_patches = (_VIDEO_MAE, "VideoMAEPatchEmbeddings")
    _zeta_replaced = ()

    @dispatch.traced_as_peer
    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None, *args, **kwargs):
        y = None
        if not args and not kwargs:
            y = self.try_fused(pixel_values, bool_masked_pos)
        if y is None:
            return super().forward(pixel_values, bool_masked_pos, *args, **kwargs)
        return y

    def try_fused(self, pixel_values: Tensor, mask: Tensor | None) -> Tensor | None:
        """The fused (B, L, D) tokens, or None: the peer's forward runs."""
        if not self._zeta_untouched():
            return None
        patches = self.patch_embeddings
        conv = patches.projection
        if (
            pixel_values.ndim != 5
            or pixel_values.shape[2] != patches.num_channels  # the peer raises its own errors
            or tuple(pixel_values.shape[-2:]) != tuple(patches.image_size)
            or patch_conv_problem(conv) is not None  # the conv may have been changed in place
        ):
            return None
        x = pixel_values.permute(0, 2, 1, 3, 4)  # (B, C, T, H, W), as the peer's patch module
        weight, bias = param(conv, "weight"), param(conv, "bias")
        if not self.zeta_fusable(x, patches, conv) or not _hf.agrees(x, (weight, bias)):
            return None
        tokens = math.prod(patch_grid(x, conv.kernel_size))
        table = self.position_embeddings
        if not isinstance(table, Tensor) or table.shape != (1, tokens, conv.out_channels):
            return None  # the peer's add raises (or broadcasts)
        keep = None
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != (x.shape[0], tokens):
                return None  # the peer's indexing decides what such a mask means
            keep = _visible_patches(mask, x)
            if keep.shape[1] == 0:
                return None  # every patch masked: the peer's empty result
        # The peer adds the table detached, cast to the conv output's dtype, on its device.
        pos = table[0].detach().to(x.device, fused_dtypes(x, weight, False)[1])
        stem = Stem(pos, None, None)
        return conv_stem(x, conv, lambda _grid: stem, keep=None if keep is None else lambda _: keep)


def _video_mae_problem(m: nn.Module) -> str | None:
    why = _hf.forward_problem(m, _hf.model_class(type(m), _VIDEO_MAE, "VideoMAEEmbeddings"))
    patches = m._modules.get("patch_embeddings")
    peer = _hf.model_class(type(patches), _VIDEO_MAE, "VideoMAEPatchEmbeddings")
    if why is None and peer is None:
        why = f"patch_embeddings is {type(patches).__name__}, not VideoMAEPatchEmbeddings"
    why = why or _hf.forward_problem(patches, peer)
    conv = None if why else patches._modules.get("projection")
    if why is None and (conv is None or patch_conv_problem(conv) or len(conv.kernel_size) != 3):
        why = "projection: " + (patch_conv_problem(conv) or "not a 3-D patch conv")
    return why


STEM_KINDS = (
    _vit_mae_kind,
    StemKind("transformers VideoMAEEmbeddings",
             lambda m: _hf.model_class(type(m), _VIDEO_MAE, "VideoMAEEmbeddings") is not None,
             _video_mae_problem, lambda m, backend: swap(m, _FusedVideoMAEEmbeddings, backend)),
)  # fmt: skip
