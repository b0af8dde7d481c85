"""OpenCLIP: whole stem of ``VisionTransformer``: ``_embeds`` (conv1, class and position
embeddings, ``patch_dropout``, then ``ln_pre``) as one fused call. With patch dropout active
(training, ``patch_dropout > 0``) the stem draws the patches to keep as OpenCLIP's
``PatchDropout`` draws them (the same random numbers, on the same device) and embeds only
those. A hook on either module has it run on the fused tokens. ``forward`` and
``forward_intermediates`` call ``_embeds``, so both run the fused stem.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import dispatch
from ..functional import fused_dtypes
from ..nn.norms import norm_problem, norm_value
from ..nn.params import forward_of, param, plain
from ..op.args import Stem
from ._base import (
    FusedStem,
    HandoffTokenDrop,
    StemKind,
    call_scope,
    conv_stem,
    handoff_drop_class,
    is_instance,
    overrides,
    peer_class,
    swap,
)
from .convs import patch_conv_problem

_OPEN_CLIP = "open_clip.transformer"


def _patch_dropout(drop: nn.Module) -> bool:
    """``drop`` is OpenCLIP's ``PatchDropout`` computing what OpenCLIP's does (as converted:
    the stem may draw for it)."""
    cls = peer_class(_OPEN_CLIP, "PatchDropout")
    return isinstance(drop, cls) and forward_of(drop) in (cls.forward, HandoffTokenDrop.forward)


def _patch_dropout_off(drop: nn.Module) -> bool:
    """OpenCLIP's patch dropout returns its input as it is in this call."""
    if plain(drop, nn.Identity):
        return True
    return _patch_dropout(drop) and (not drop.training or drop.prob == 0.0)


def _stem_draws(drop: nn.Module) -> bool:
    """The stem can make ``drop``'s draw in this call and embed only the patches it keeps:
    OpenCLIP's PatchDropout as converted, active, keeping the class row in front (without
    ``exclude_first_token`` the class row may be dropped: the op keeps prefix rows)."""
    return (
        plain(drop, HandoffTokenDrop)
        and _patch_dropout(drop)
        and drop.training
        and drop.prob > 0.0
        and drop.exclude_first_token
    )


def _draw_keep(drop: nn.Module, batch: int, tokens: int, device: torch.device) -> Tensor:
    """The patches OpenCLIP's ``PatchDropout.forward`` keeps of ``tokens`` per image: the same
    random numbers (drawn on the default device, as OpenCLIP draws them), the same ``topk``,
    then moved to the image's device for the op."""
    num_keep = max(1, int(tokens * (1 - drop.prob)))
    return torch.randn(batch, tokens).topk(num_keep, dim=-1).indices.to(device)


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

    @dispatch.traced_as_peer
    def _embeds(self, x: Tensor) -> Tensor:
        conv, drop, norm = self.conv1, self.patch_dropout, self.ln_pre
        # patch_dropout's draw is made here when nothing needs it to run itself (a hook);
        # ln_pre is fused where skipping it and patch_dropout is exact.
        drawing = _stem_draws(drop) and not any(dispatch.hook_dicts(drop))
        casts = None
        if (drawing or _patch_dropout_off(drop)) and not any(dispatch.hook_dicts(drop, norm)):
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
        drawn = []  # the patches kept, once drawn

        def keep(grid: tuple[int, ...]) -> Tensor:
            drawn.append(_draw_keep(drop, x.shape[0], grid[0] * grid[1], x.device))
            return drawn[0]

        y = conv_stem(x, conv, lambda _: Stem(table[1:], prefix, stem_norm),
                      keep=keep if drawing else None)  # fmt: skip
        if y is None and drawn:  # the peer's code, its patch_dropout keeping the drawn patches
            with call_scope({"drawn": (None, 1, drawn[0])}, drop):
                return super()._embeds(x)
        if y is None:
            return super()._embeds(x)
        if casts is None:  # hooks, another norm: they run on the tokens
            return norm(y if drawing else drop(y))
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


def _convert(m: nn.Module, backend: str) -> None:
    handoff_drop_class(m.patch_dropout, peer_class(_OPEN_CLIP, "PatchDropout"))
    swap(m, _FusedOpenClipViT, backend)


STEM_KINDS = (
    StemKind("OpenCLIP VisionTransformer", is_instance(_OPEN_CLIP, "VisionTransformer"),
             _open_clip_problem, _convert),
)  # fmt: skip
