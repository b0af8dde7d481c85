"""transformers: whole stems of vision models: ViT, DeiT, DINOv2 and DINOv2 with registers,
each as one call of the fused op, and what every transformers stem shares (the per-call path,
the kinds); CLIP, SigLIP and AIMv2 are in ``transformers_clip``, the masked pretraining models
in ``transformers_masked``.

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

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import dispatch
from ..checks import norm_tensors
from ..nn.norms import norm_problem, norm_value
from ..nn.params import param, plain
from ..op.args import Stem
from ._base import FusedStem, StemKind, conv_stem, overrides, peer_class, swap
from .convs import _conv_semantics, patch_conv_problem

# (prefix rows (P, D) or None, patch position table (N, D) or None), or None: the tables do
# not fit this call (the peer's forward raises its own error for that).
Rows = tuple[Tensor | None, Tensor | None] | None


def hf_class(cls: type, module: str, name: str) -> type | None:
    """The transformers class ``transformers.models.<module>.<name>`` among ``cls``'s bases
    (itself included), or None."""
    full = f"transformers.models.{module}"
    return next((c for c in cls.__mro__ if c.__name__ == name and c.__module__ == full), None)


def _forward_problem(m: nn.Module, peer: type) -> str | None:
    if type(m).forward is not peer.forward:
        return f"{type(m).__name__} overrides {peer.__name__}.forward"
    return None


def _conv_problem(conv: nn.Module | None) -> str | None:
    if conv is None:
        return "no patch projection conv"
    why = patch_conv_problem(conv)
    if why is None and len(conv.kernel_size) != 2:
        why = f"projection is a {len(conv.kernel_size)}-D conv, not an image patch conv"
    return None if why is None else f"projection: {why}"


def _stand_in(x: Tensor, rows: int, dim: int) -> Tensor:
    """A (B, rows, D) tensor for the peer's ``interpolate_pos_encoding(embeddings, h, w)``,
    which reads only the embeddings' shape: no tokens are computed for it."""
    return x.new_zeros(()).expand(x.shape[0], rows, dim)


def _first_rows(table: Tensor, tokens: int, prefix: Tensor, count: int) -> Rows:
    """A (1, count + N, D) table added after ``cat(prefix, tokens)``: (prefix + its first
    ``count`` rows, the rest for the N patch tokens); None when it has another shape."""
    if table.shape != (1, count + tokens, prefix.shape[-1]):
        return None
    return prefix + table[0, :count], table[0, count:]


def _agrees(x: Tensor, tensors: tuple[Tensor | None, ...]) -> bool:
    """Outside autocast the op takes every tensor in the input's dtype and on its device; the
    peer would promote mixed dtypes (or raise its own error), so such calls run the peer."""
    if torch.is_autocast_enabled(x.device.type):
        return True
    for t in tensors:  # a plain loop: torch.compile traces it without a graph break
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            return False
    return True


class _FusedHFEmbeddings(FusedStem):
    """Shared per-call path of the fused transformers embeddings."""

    # The peer class of the ``patch_embeddings`` module whose call the fused forward replaces
    # (``transformers.models.<module>``, name); None: the embeddings call their conv directly.
    _zeta_patches: tuple[str, str] | None = None
    # The peer's methods the fused forward calls otherwise than the peer's forward does (with a
    # stand-in of the tokens, with patch indices): each is the peer class's own.
    _zeta_replaced: tuple[str, ...] = ("interpolate_pos_encoding",)

    def _zeta_untouched(self) -> bool:
        """Nothing the fused forward replaces changed since conversion, checked per call (then
        the peer's forward runs): ``patch_embeddings`` still runs its peer class's forward (not
        a module with a forward of its own set in its place), and no replaced method is set on
        the instance."""
        for method in self._zeta_replaced:  # a plain loop: torch.compile traces it
            if method in self.__dict__:
                return False
        if self._zeta_patches is None:
            return True
        module, name = self._zeta_patches
        peer = peer_class(f"transformers.models.{module}", name)
        return peer is not None and plain(self._modules.get("patch_embeddings"), peer)

    def _zeta_rows(self, x: Tensor, conv: nn.Module, skipped: tuple[nn.Module, ...],
                   rows: Callable[[int], Rows], norm: nn.Module | None = None,
                   post: nn.Module | None = None,
                   keep: Callable[[tuple[int, ...]], Tensor] | None = None,
                   ) -> Tensor | None:  # fmt: skip
        """The fused (B, P + N, D) rows (``rows(N)`` gives the prefix and the patch table), or
        None: this call must run the peer's forward. ``skipped``: the modules the peer would
        call and the fused path does not (their hooks make the call run the peer's). ``norm``:
        the stem norm (a hand-off), ``post``: a norm of the patch tokens before the table,
        ``keep``: the patches embedded (``_base.conv_stem``), (B, P + L, D) rows then."""
        patch = tuple(conv.kernel_size)
        if (
            x.ndim != 4
            or x.shape[1] != conv.in_channels  # the peer raises its own error
            or _conv_problem(conv) is not None  # the conv may have been changed in place
            or (post is not None and norm_problem(post, conv.out_channels) is not None)
            or _conv_semantics(x, patch)
            or not self.zeta_fusable(x, *skipped)
        ):
            return None
        if not _agrees(x, (param(conv, "weight"), param(conv, "bias"))):
            return None  # checked before rows(), which may call the peer's modules
        tokens = (x.shape[2] // patch[0]) * (x.shape[3] // patch[1])
        parts = rows(tokens)
        if parts is None:
            return None
        prefix, pos = parts
        if pos is not None and pos.shape != (tokens, conv.out_channels):
            return None
        stem_norm, post_norm = norm_value(norm, x.dtype), norm_value(post, x.dtype)
        if not _agrees(x, (prefix, pos, *norm_tensors(stem_norm), *norm_tensors(post_norm))):
            return None
        stem = Stem(pos, prefix, stem_norm)
        return conv_stem(x, conv, lambda _grid: stem, post_norm, keep)


# --- ViT, DeiT, DINOv2, DINOv2 with registers ------------------------------------------------


def _patch_module_problem(m: nn.Module, module: str, name: str) -> str | None:
    """``m.patch_embeddings`` is the peer's own patch module (conv, flatten, transpose)."""
    patches = m._modules.get("patch_embeddings")
    peer = None if patches is None else hf_class(type(patches), module, name)
    if peer is None:
        return f"patch_embeddings is {type(patches).__name__}, not {name}"
    return _forward_problem(patches, peer) or _conv_problem(patches._modules.get("projection"))


class _FusedViTFamily(_FusedHFEmbeddings):
    """ViT and DeiT: ``cat(cls[, distillation], tokens) + table``, the table given or resampled
    by the peer's ``interpolate_pos_encoding``; then dropout."""

    _zeta_tokens: tuple[str, ...] = ("cls_token",)  # the prefix token Parameters, in order

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

            def rows(tokens: int) -> Rows:
                prefix = torch.cat([param(self, t).flatten(0, 1) for t in self._zeta_tokens])
                table = param(self, "position_embeddings")
                if interpolate_pos_encoding:
                    stand_in = _stand_in(pixel_values, len(prefix) + tokens, prefix.shape[-1])
                    height, width = pixel_values.shape[-2:]
                    table = self.interpolate_pos_encoding(stand_in, height, width)
                return _first_rows(table, tokens, prefix, len(prefix))

            if pixel_values.ndim == 4 and pixel_values.shape[1] == patches.num_channels:
                y = self._zeta_rows(pixel_values, conv, (patches, conv), rows)
        if y is None:
            return super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding,
                                   *args, **kwargs)  # fmt: skip
        return self.dropout(y)


class _FusedViTEmbeddings(_FusedViTFamily):
    """transformers ``ViTEmbeddings``, fused."""

    _zeta_patches = ("vit.modeling_vit", "ViTPatchEmbeddings")


class _FusedDeiTEmbeddings(_FusedViTFamily):
    """transformers ``DeiTEmbeddings`` (class and distillation tokens), fused."""

    _zeta_tokens = ("cls_token", "distillation_token")
    _zeta_patches = ("deit.modeling_deit", "DeiTPatchEmbeddings")


class _FusedDinov2Family(_FusedHFEmbeddings):
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

            def rows(tokens: int) -> Rows:
                cls = param(self, "cls_token").flatten(0, 1)
                table = param(self, "position_embeddings")
                if table is None:  # the peer adds no positions then
                    prefix, pos = cls, None
                else:
                    stand_in = _stand_in(x, 1 + tokens, cls.shape[-1])
                    table = self.interpolate_pos_encoding(stand_in, *pixel_values.shape[-2:])
                    parts = _first_rows(table, tokens, cls, 1)
                    if parts is None:
                        return None
                    prefix, pos = parts
                if self._zeta_registers:  # spliced in after the position add: no positions
                    prefix = torch.cat([prefix, param(self, "register_tokens").flatten(0, 1)])
                return prefix, pos

            y = self._zeta_rows(x, conv, (patches, conv), rows)
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


# --- The kinds ---------------------------------------------------------------------------------


def _embeddings_kind(module: str, name: str, mixin: type, conv: str = "patch_embedding",
                     norm: str | None = None) -> StemKind:  # fmt: skip
    """The kind of the embeddings class ``name`` of ``transformers.models.<module>`` fused by
    ``mixin``; its conv is ``patch_embeddings.projection`` (of the mixin's ``_zeta_patches``
    class), or the child ``conv``; the child ``norm``, if any, normalises its tokens."""

    def problem(m: nn.Module) -> str | None:
        peer = hf_class(type(m), module, name)
        why = _forward_problem(m, peer)
        for method in mixin._zeta_replaced:
            why = why or overrides(m, peer, method)
        if why is None and mixin._zeta_patches is not None:
            why = _patch_module_problem(m, *mixin._zeta_patches)
        elif why is None:
            why = _conv_problem(m._modules.get(conv))
        if why is None and norm is not None:
            why = norm_problem(m._modules.get(norm), m._modules[conv].out_channels)
            why = why and f"{norm}: {why}"
        return why

    def convert(m: nn.Module, backend: str) -> None:
        # Its patch conv, which runs when a call falls back (a mask token...), is converted by
        # fuse_patch_embeddings after the stems.
        swap(m, mixin, backend)

    def matches(m: nn.Module) -> bool:
        return hf_class(type(m), module, name) is not None

    return StemKind(f"transformers {name}", matches, problem, convert)


STEM_KINDS = (
    _embeddings_kind("vit.modeling_vit", "ViTEmbeddings", _FusedViTEmbeddings),
    _embeddings_kind("deit.modeling_deit", "DeiTEmbeddings", _FusedDeiTEmbeddings),
    _embeddings_kind("dinov2.modeling_dinov2", "Dinov2Embeddings", _FusedDinov2Embeddings),
    _embeddings_kind("dinov2_with_registers.modeling_dinov2_with_registers",
                     "Dinov2WithRegistersEmbeddings", _FusedDinov2WithRegistersEmbeddings),
)  # fmt: skip
