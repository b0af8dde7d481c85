"""OpenCLIP: whole stem of ``VisionTransformer``: ``_embeds`` (conv1, class and position
embeddings, then ``ln_pre``, fused while ``patch_dropout`` does nothing for the call; with patch
dropout active, or a hook on either, the two run on the fused tokens). ``forward`` and
``forward_intermediates`` call ``_embeds``, so both run the fused stem.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import dispatch
from ..functional import fused_dtypes
from ..nn.norms import norm_problem, norm_value
from ..nn.params import param, plain
from ..op.args import Stem
from ._base import FusedStem, StemKind, conv_stem, is_instance, overrides, peer_class, swapper
from .convs import patch_conv_problem

_OPEN_CLIP = "open_clip.transformer"


def _patch_dropout_off(drop: nn.Module) -> bool:
    """OpenCLIP's patch dropout returns its input as it is in this call."""
    if plain(drop, nn.Identity):
        return True
    cls = peer_class(_OPEN_CLIP, "PatchDropout")
    return plain(drop, cls) and (not drop.training or drop.prob == 0.0)


def _clip_norm_casts(norm: nn.Module, dim: int) -> bool | None:
    """For a norm over ``dim`` the op computes: whether it casts its output back to its input's
    dtype (OpenCLIP's ``LayerNorm`` and ``LayerNormFp32`` do); None for any other module."""
    if norm_problem(norm, dim) is not None:
        return None
    casting = [peer_class(_OPEN_CLIP, name) for name in ("LayerNorm", "LayerNormFp32")]
    return any(c is not None and isinstance(norm, c) for c in casting)


class _FusedOpenClipViT(FusedStem):
    """OpenCLIP ``VisionTransformer`` whose ``_embeds`` (used by ``forward`` and
    ``forward_intermediates``) runs conv1, class and position embeddings and ln_pre fused."""

    def _embeds(self, x: Tensor) -> Tensor:
        conv, drop, norm = self.conv1, self.patch_dropout, self.ln_pre
        casts = None  # ln_pre is fused only where skipping it and patch_dropout is exact
        if _patch_dropout_off(drop) and not any(dispatch.hook_dicts(drop, norm)):
            casts = _clip_norm_casts(norm, conv.out_channels)
        if x.ndim != 4 or not self.zeta_fusable(x, conv):
            return super()._embeds(x)
        dim, (ph, pw) = conv.out_channels, conv.kernel_size
        cls, table = param(self, "class_embedding"), param(self, "positional_embedding")
        tokens = (x.shape[2] // ph) * (x.shape[3] // pw)
        if cls.shape != (dim,) or table.shape != (tokens + 1, dim):
            return super()._embeds(x)  # the peer's add would not broadcast: its own error
        # The peer casts both to the conv output's dtype before adding them.
        token_dtype = fused_dtypes(x, param(conv, "weight"), False)[1]
        table = table.to(token_dtype)
        prefix = (cls.to(token_dtype) + table[0]).unsqueeze(0)
        stem_norm = None if casts is None else norm_value(norm, x.dtype)
        y = conv_stem(x, conv, lambda _: Stem(table[1:], prefix, stem_norm))
        if y is None:
            return super()._embeds(x)
        if casts is None:  # patch dropout active, hooks, another norm: both run on the tokens
            return norm(drop(y))
        return y.to(token_dtype) if casts else y


def _open_clip_problem(m: nn.Module) -> str | None:
    cls = peer_class(_OPEN_CLIP, "VisionTransformer")
    if not hasattr(cls, "_embeds"):
        return "this open_clip release has no VisionTransformer._embeds (its stem is inline)"
    why = overrides(m, cls, "_embeds") or patch_conv_problem(m.conv1)
    if why:
        return why
    if not isinstance(m.positional_embedding, Tensor) or m.positional_embedding.ndim != 2:
        return "positional_embedding is not an (N + 1, D) table"
    return None


STEM_KINDS = (
    StemKind("OpenCLIP VisionTransformer", is_instance(_OPEN_CLIP, "VisionTransformer"),
             _open_clip_problem, swapper(_FusedOpenClipViT)),
)  # fmt: skip
