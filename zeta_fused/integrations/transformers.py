"""transformers: whole stems of vision models: ViT, DeiT, DINOv2 and DINOv2 with registers,
each as one call of the fused op; CLIP, SigLIP and AIMv2 are in ``transformers_clip``, the
masked pretraining models in ``transformers_masked``, and what every transformers stem shares
(the per-call path, the kinds) in ``_hf``.

Every peer builds ``dropout(cat(prefix tokens, conv(x) tokens) + position table)`` (DINOv2 with
registers splices its registers in after the class row, after the add; SigLIP has no prefix).
The fused forward computes the prefix rows and the table with torch ops (the peer's own
``interpolate_pos_encoding`` or ``position_embedding`` call when the peer makes one), hands them
to the op and applies the peer's dropout to its output. CLIP's ``pre_layrnorm``, which its
owner applies right after the embeddings, is fused through the hand-off (``_base``). Whatever
a call does that the op does not (a mask token, an input the peer rejects, a hook on a module
it would skip, unknown arguments) runs the peer's forward.

Classes are recognised by their module and name among the module's bases, so this module never
imports transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from ..nn.params import param
from . import _hf

# --- ViT, DeiT, DINOv2, DINOv2 with registers ------------------------------------------------


class _FusedViTFamily(_hf.FusedEmbeddings):
    """ViT and DeiT: ``cat(cls[, distillation], tokens) + table``, the table given or resampled
    by the peer's ``interpolate_pos_encoding``; then dropout."""

    _zeta_prefix_tokens: tuple[str, ...] = ("cls_token",)  # the prefix Parameters, in order

    @dispatch.traced_as_peer
    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None,
                interpolate_pos_encoding: bool = False, *args, **kwargs) -> Tensor:  # fmt: skip
        y = None
        sized = tuple(pixel_values.shape[-2:]) == tuple(self.image_size)
        if (
            bool_masked_pos is None
            and not args
            and not kwargs
            and (interpolate_pos_encoding or sized)
            and self._zeta_untouched()
        ):
            patches = self.patch_embeddings
            conv = patches.projection

            def rows(tokens: int) -> _hf.Rows:
                prefix = torch.cat([param(self, t).flatten(0, 1) for t in self._zeta_prefix_tokens])
                table = param(self, "position_embeddings")
                if interpolate_pos_encoding:
                    embeddings = _hf.stand_in(pixel_values, len(prefix) + tokens, prefix.shape[-1])
                    height, width = pixel_values.shape[-2:]
                    table = self.interpolate_pos_encoding(embeddings, height, width)
                return _hf.first_rows(table, tokens, prefix, len(prefix))

            if pixel_values.ndim == 4 and pixel_values.shape[1] == patches.num_channels:
                y = _hf.fused_rows(self, pixel_values, conv, (patches, conv), rows)
        if y is None:
            return super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding,
                                   *args, **kwargs)  # fmt: skip
        return self.dropout(y)


class _FusedViTEmbeddings(_FusedViTFamily):
    """transformers ``ViTEmbeddings``, fused."""

    _zeta_patches = ("vit.modeling_vit", "ViTPatchEmbeddings")


class _FusedDeiTEmbeddings(_FusedViTFamily):
    """transformers ``DeiTEmbeddings`` (class and distillation tokens), fused."""

    _zeta_prefix_tokens = ("cls_token", "distillation_token")
    _zeta_patches = ("deit.modeling_deit", "DeiTPatchEmbeddings")


class _FusedDinov2Family(_hf.FusedEmbeddings):
    """DINOv2 (with or without registers): the input cast to the conv's dtype, the table
    always through the peer's ``interpolate_pos_encoding`` (it returns the table itself for
    the trained size), then registers after the class row and dropout."""

    _zeta_registers: bool = False

    @dispatch.traced_as_peer
    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None,
                *args, **kwargs) -> Tensor:  # fmt: skip
        y = None
        if (
            bool_masked_pos is None
            and not args
            and not kwargs
            and pixel_values.ndim == 4
            and self._zeta_untouched()
            and pixel_values.shape[1] == self.patch_embeddings.num_channels
        ):
            patches = self.patch_embeddings
            conv = patches.projection
            x = pixel_values.to(param(conv, "weight").dtype)  # as the peer's patch module does

            def rows(tokens: int) -> _hf.Rows:
                cls = param(self, "cls_token").flatten(0, 1)
                table = param(self, "position_embeddings")
                if table is None:  # the peer adds no positions then
                    prefix, pos = cls, None
                else:
                    embeddings = _hf.stand_in(x, 1 + tokens, cls.shape[-1])
                    table = self.interpolate_pos_encoding(embeddings, *pixel_values.shape[-2:])
                    parts = _hf.first_rows(table, tokens, cls, 1)
                    if parts is None:
                        return None
                    prefix, pos = parts
                if self._zeta_registers:  # spliced in after the position add: no positions
                    prefix = torch.cat([prefix, param(self, "register_tokens").flatten(0, 1)])
                return prefix, pos

            y = _hf.fused_rows(self, x, conv, (patches, conv), rows)
        if y is None:
            return super().forward(pixel_values, bool_masked_pos, *args, **kwargs)
        return self.dropout(y)


class _FusedDinov2Embeddings(_FusedDinov2Family):
    """transformers ``Dinov2Embeddings``, fused."""

    _zeta_patches = ("dinov2.modeling_dinov2", "Dinov2PatchEmbeddings")


class _FusedDinov2WithRegistersEmbeddings(_FusedDinov2Family):
    """transformers ``Dinov2WithRegistersEmbeddings``, fused."""

    _zeta_registers = True
    _zeta_patches = ("dinov2_with_registers.modeling_dinov2_with_registers",
                     "Dinov2WithRegistersPatchEmbeddings")  # fmt: skip


STEM_KINDS = (
    _hf.embeddings_kind("vit.modeling_vit", "ViTEmbeddings", _FusedViTEmbeddings),
    _hf.embeddings_kind("deit.modeling_deit", "DeiTEmbeddings", _FusedDeiTEmbeddings),
    _hf.embeddings_kind("dinov2.modeling_dinov2", "Dinov2Embeddings", _FusedDinov2Embeddings),
    _hf.embeddings_kind("dinov2_with_registers.modeling_dinov2_with_registers",
                        "Dinov2WithRegistersEmbeddings", _FusedDinov2WithRegistersEmbeddings),
)  # fmt: skip
