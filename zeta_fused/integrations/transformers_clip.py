"""transformers: whole stems of CLIP, SigLIP, SigLIP2 (NaFlex) and AIMv2 vision embeddings (a
patch conv, or SigLIP2's Linear over patch rows; the class embedding for CLIP, the position
table; AIMv2's RMSNorm before the table), each as one call of the fused op, and CLIP's
``pre_layrnorm`` fused through the hand-off of ``_base``. What every transformers stem shares
is in ``_hf``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import dispatch
from ..functional import fused_call
from ..nn.norms import norm_problem
from ..nn.params import param, plain
from ..op.args import Stem
from . import _hf
from ._base import FusedStem, StemKind, hand_off, handoff_class, handoff_scope, pending_norm, swap

# --- CLIP and SigLIP vision embeddings -------------------------------------------------------


class _FusedConvEmbeddings(_hf.FusedEmbeddings):
    """CLIP and SigLIP: the input cast to the conv's dtype, ``[cat(class_embedding, tokens)] +
    position_embedding(position_ids)`` or the peer's ``interpolate_pos_encoding``; no dropout.
    CLIP's owner may hand its ``pre_layrnorm`` over (``_base.handoff_scope``)."""

    _zeta_class_row: bool = True  # CLIP's class_embedding; SigLIP has no prefix row

    @dispatch.traced_as_peer
    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                *args, **kwargs) -> Tensor:  # fmt: skip
        y = norm = None
        conv = self.patch_embedding
        sized = tuple(pixel_values.shape[-2:]) == (self.image_size, self.image_size)
        if (
            not args
            and not kwargs
            and (interpolate_pos_encoding or sized or not self._zeta_class_row)
            and self._zeta_untouched()
        ):
            # The owner's norm is applied here only when this module has no hooks of its own:
            # a forward hook would see normalised rows instead of the embeddings.
            if not any(dispatch.hook_dicts(self)):
                norm = pending_norm(self, self.embed_dim)
            x = pixel_values.to(param(conv, "weight").dtype)  # as the peer does

            def rows(tokens: int) -> _hf.Rows:
                count = 1 if self._zeta_class_row else 0
                if interpolate_pos_encoding:
                    embeddings = _hf.stand_in(x, count + tokens, conv.out_channels)
                    table = self.interpolate_pos_encoding(embeddings, *pixel_values.shape[-2:])
                else:
                    table = self.position_embedding(self.position_ids)
                if not count:
                    ok = table.shape == (1, tokens, conv.out_channels)
                    return (None, table[0]) if ok else None
                return _hf.first_rows(table, tokens, param(self, "class_embedding")[None], 1)

            y = _hf.fused_rows(self, x, conv, (conv,), rows, norm)
        if y is None:
            return super().forward(pixel_values, interpolate_pos_encoding, *args, **kwargs)
        return y if norm is None else hand_off(norm, y)


class _FusedCLIPVisionEmbeddings(_FusedConvEmbeddings):
    """transformers ``CLIPVisionEmbeddings``, fused (with ``pre_layrnorm`` when handed over)."""


class _FusedSiglipVisionEmbeddings(_FusedConvEmbeddings):
    """transformers ``SiglipVisionEmbeddings``, fused."""

    _zeta_class_row = False


class _FusedSiglip2VisionEmbeddings(FusedStem):
    """transformers ``Siglip2VisionEmbeddings`` (NaFlex): patch rows padded to (B, N, K) ->
    Linear -> + the position table resized for each image by the peer's own
    ``resize_positional_embeddings`` (B, N, D), as one call of the fused op over the B * N rows,
    each adding its own row of the resized tables. The padding rows are embedded too: the peer
    returns them (each with its image's first table row), and a drop-in returns the same."""

    @dispatch.traced_as_peer
    def forward(self, pixel_values: Tensor, spatial_shapes: Tensor, *args, **kwargs) -> Tensor:
        y = None
        linear = self.patch_embedding
        if (
            not args
            and not kwargs
            and pixel_values.ndim == 3
            and plain(linear, nn.Linear)  # not a LoRA-style Linear set in its place
            and pixel_values.shape[-1] == linear.in_features  # else the peer's own error
            and self.zeta_fusable(pixel_values, linear)
        ):
            y = self.try_fused(pixel_values, spatial_shapes)
        return super().forward(pixel_values, spatial_shapes, *args, **kwargs) if y is None else y

    def try_fused(self, pixel_values: Tensor, spatial_shapes: Tensor) -> Tensor | None:
        """The fused (B, N, D) embeddings, or None: the peer's forward runs."""
        linear, weight = self.patch_embedding, param(self.patch_embedding, "weight")
        bias, table = param(linear, "bias"), param(self.position_embedding, "weight")
        x = pixel_values.to(weight.dtype)  # as the peer does
        if not _hf.agrees(x, (weight, bias, table)):
            return None
        side = self.position_embedding_size
        resized = self.resize_positional_embeddings(
            table.reshape(side, side, -1), spatial_shapes, max_length=x.shape[1]
        )
        # Each row is a one-patch "image" (K, 1) that takes row i of the flattened tables.
        rows = x.flatten(0, 1)
        index = torch.arange(rows.shape[0], device=rows.device).view(-1, 1)
        stem = Stem(resized.flatten(0, 1), None, None, index)
        y = fused_call(rows.unsqueeze(-1), (1,), weight, tuple(weight.shape), bias, stem=stem)
        return None if y is None else y.view(*x.shape[:2], -1)


_SIGLIP2 = "siglip2.modeling_siglip2"


def _siglip2_matches(m: nn.Module) -> bool:
    return _hf.model_class(type(m), _SIGLIP2, "Siglip2VisionEmbeddings") is not None


def _siglip2_problem(m: nn.Module) -> str | None:
    why = _hf.forward_problem(m, _hf.model_class(type(m), _SIGLIP2, "Siglip2VisionEmbeddings"))
    linear = m._modules.get("patch_embedding")
    if why is None and not plain(linear, nn.Linear):
        why = f"patch_embedding is {type(linear).__name__}, not nn.Linear"
    return why


class _FusedAimv2VisionEmbeddings(_hf.FusedEmbeddings):
    """transformers ``Aimv2VisionEmbeddings``: conv -> RMSNorm -> + the learned position
    table, fused. The native-resolution variant (a sincos table the peer builds per call) and
    calls under autocast (where the RMSNorm's fp32 weight decides the dtype: nn.norms) run the
    peer's forward."""

    _zeta_replaced = ()

    @dispatch.traced_as_peer
    def forward(self, pixel_values: Tensor, *args, **kwargs) -> Tensor:
        y = None
        conv, norm = self.patch_embed, self.rms_norm
        if not args and not kwargs and not self.config.is_native:

            def rows(tokens: int) -> _hf.Rows:
                table = self.position_embedding(self.position_ids)
                return (None, table[0]) if table.shape == (1, tokens, conv.out_channels) else None

            y = _hf.fused_rows(self, pixel_values, conv, (conv, norm), rows, post=norm)
        return super().forward(pixel_values, *args, **kwargs) if y is None else y


class _FusedCLIPVisionOwner(FusedStem):
    """The CLIP vision module owning ``embeddings`` and ``pre_layrnorm`` (``CLIPVisionModel``,
    ``CLIPVisionTransformer`` before transformers 5): its forward, with the norm handed over to
    the embeddings while it runs."""

    @dispatch.traced_as_peer
    def forward(self, pixel_values: Tensor | None = None, *args, **kwargs):
        with handoff_scope(self, self.embeddings, self.pre_layrnorm):
            return super().forward(pixel_values, *args, **kwargs)


_CLIP = "clip.modeling_clip"
_CLIP_OWNERS = ("CLIPVisionModel", "CLIPVisionTransformer")
_clip_embeddings = _hf.embeddings_kind(_CLIP, "CLIPVisionEmbeddings", _FusedCLIPVisionEmbeddings)


def _clip_owner(m: nn.Module) -> type | None:
    """The CLIP class of a module that owns the vision embeddings and ``pre_layrnorm``."""
    if "pre_layrnorm" not in m._modules or "embeddings" not in m._modules:
        return None
    return next((c for n in _CLIP_OWNERS if (c := _hf.model_class(type(m), _CLIP, n))), None)


def _clip_owner_problem(m: nn.Module) -> str | None:
    norm, embeddings = m._modules["pre_layrnorm"], m._modules["embeddings"]
    why = _hf.forward_problem(m, _clip_owner(m))
    if why:
        return why
    if not _clip_embeddings.matches(embeddings):
        return f"embeddings is {type(embeddings).__name__}, not CLIPVisionEmbeddings"
    why = norm_problem(norm, embeddings.embed_dim)
    if why:
        return f"pre_layrnorm: {why}"
    why = _clip_embeddings.problem(embeddings)
    return None if why is None else f"embeddings: {why}"


def _convert_clip_owner(m: nn.Module, backend: str) -> None:
    # The embeddings are converted by their own kind, met next in the walk.
    swap(m, _FusedCLIPVisionOwner, backend)
    handoff_class(m.pre_layrnorm)


# The walk meets a CLIP owner before its embeddings: the owner's kind swaps the owner and its
# norm, the embeddings' kind the embeddings.
STEM_KINDS = (
    _hf.embeddings_kind("siglip.modeling_siglip", "SiglipVisionEmbeddings",
                        _FusedSiglipVisionEmbeddings),
    _hf.embeddings_kind("aimv2.modeling_aimv2", "Aimv2VisionEmbeddings",
                        _FusedAimv2VisionEmbeddings, conv="patch_embed", norm="rms_norm"),
    StemKind("transformers Siglip2VisionEmbeddings", _siglip2_matches, _siglip2_problem,
             lambda m, backend: swap(m, _FusedSiglip2VisionEmbeddings, backend)),
    _clip_embeddings,
    StemKind("transformers CLIP vision pre_layrnorm (hand-off)",
             lambda m: _clip_owner(m) is not None, _clip_owner_problem, _convert_clip_owner),
)  # fmt: skip
