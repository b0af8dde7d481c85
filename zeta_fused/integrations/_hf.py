"""What the transformers converters share (``transformers``, ``transformers_clip``,
``transformers_masked``): recognising transformers classes without importing transformers, the
per-call path of fused embeddings over a patch conv (:func:`fused_rows`), the tables it takes,
and the :class:`~zeta_fused.integrations._base.StemKind` of an embeddings class
(:func:`embeddings_kind`).

Every peer builds ``dropout(cat(prefix tokens, conv(x) tokens) + position table)`` (or a part of
it): the fused forward computes the prefix rows and the table with torch ops (the peer's own
``interpolate_pos_encoding`` or ``position_embedding`` call when the peer makes one) and hands
them to the op. Whatever a call does that the op does not (a mask token, an input the peer
rejects, a hook on a module it would skip, unknown arguments) runs the peer's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..checks import norm_tensors
from ..nn.norms import norm_problem, norm_value
from ..nn.params import param, plain
from ..op.args import Stem
from ._base import FusedStem, Keep, StemKind, conv_stem, overrides, peer_class, swap
from .convs import conv_runs_itself, patch_conv_problem

# (prefix rows (P, D) or None, patch position table (N, D) or None), or None: the tables do
# not fit this call (the peer's forward raises its own error for that).
Rows = tuple[Tensor | None, Tensor | None] | None


def model_class(cls: type, module: str, name: str) -> type | None:
    """The transformers class ``transformers.models.<module>.<name>`` among ``cls``'s bases
    (itself included), or None."""
    full = f"transformers.models.{module}"
    return next((c for c in cls.__mro__ if c.__name__ == name and c.__module__ == full), None)


def forward_problem(m: nn.Module, peer: type) -> str | None:
    """Why ``m``'s class computes something else than ``peer`` (it overrides its forward), or
    None."""
    if type(m).forward is not peer.forward:
        return f"{type(m).__name__} overrides {peer.__name__}.forward"
    return None


def conv_problem(conv: nn.Module | None) -> str | None:
    """Why ``conv`` is not an image patch conv the op computes, or None."""
    if conv is None:
        return "no patch projection conv"
    why = patch_conv_problem(conv)
    if why is None and len(conv.kernel_size) != 2:
        why = f"projection is a {len(conv.kernel_size)}-D conv, not an image patch conv"
    return None if why is None else f"projection: {why}"


def stand_in(x: Tensor, rows: int, dim: int) -> Tensor:
    """A (B, rows, D) tensor for the peer's ``interpolate_pos_encoding(embeddings, h, w)``,
    which reads only the embeddings' shape: no tokens are computed for it."""
    return x.new_zeros(()).expand(x.shape[0], rows, dim)


def first_rows(table: Tensor, tokens: int, prefix: Tensor, count: int) -> Rows:
    """A (1, count + N, D) table added after ``cat(prefix, tokens)``: (prefix + its first
    ``count`` rows, the rest for the N patch tokens); None when it has another shape."""
    if table.shape != (1, count + tokens, prefix.shape[-1]):
        return None
    return prefix + table[0, :count], table[0, count:]


def agrees(x: Tensor, tensors: tuple[Tensor | None, ...]) -> bool:
    """Outside autocast the op takes every tensor in the input's dtype and on its device; the
    peer would promote mixed dtypes (or raise its own error), so such calls run the peer."""
    if torch.is_autocast_enabled(x.device.type):
        return True
    for t in tensors:  # a plain loop: torch.compile traces it without a graph break
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            return False
    return True


class FusedEmbeddings(FusedStem):
    """Base of the fused transformers embeddings: what the per-call path checks of them."""

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


def fused_rows(m: FusedEmbeddings, x: Tensor, conv: nn.Module,
               skipped: tuple[nn.Module, ...], rows: Callable[[int], Rows],
               norm: nn.Module | None = None, post: nn.Module | None = None,
               keep: Keep | None = None) -> Tensor | None:  # fmt: skip
    """The fused (B, P + N, D) rows of the embeddings ``m`` over their patch ``conv``
    (``rows(N)`` gives the prefix and the patch table), or None: this call must run the peer's
    forward. ``skipped``: the modules the peer would call and the fused path does not (their
    hooks make the call run the peer's). ``norm``: the stem norm (a hand-off), ``post``: a norm
    of the patch tokens before the table, ``keep``: the patches embedded
    (:func:`~zeta_fused.integrations._base.conv_stem`), (B, P + L, D) rows then."""
    patch = tuple(conv.kernel_size)
    if (
        x.ndim != 4
        or x.shape[1] != conv.in_channels  # the peer raises its own error
        or conv_problem(conv) is not None  # the conv may have been changed in place
        or (post is not None and norm_problem(post, conv.out_channels) is not None)
        or conv_runs_itself(x, patch)
        or not m.zeta_fusable(x, *skipped)
    ):
        return None
    if not agrees(x, (param(conv, "weight"), param(conv, "bias"))):
        return None  # checked before rows(), which may call the peer's modules
    tokens = (x.shape[2] // patch[0]) * (x.shape[3] // patch[1])
    parts = rows(tokens)
    if parts is None:
        return None
    prefix, pos = parts
    if pos is not None and pos.shape != (tokens, conv.out_channels):
        return None
    stem_norm, post_norm = norm_value(norm, x.dtype), norm_value(post, x.dtype)
    if not agrees(x, (prefix, pos, *norm_tensors(stem_norm), *norm_tensors(post_norm))):
        return None
    stem = Stem(pos, prefix, stem_norm)
    return conv_stem(x, conv, lambda _grid: stem, post_norm, keep)


# --- The kinds ---------------------------------------------------------------------------------


def patch_module_problem(m: nn.Module, module: str, name: str) -> str | None:
    """Why ``m.patch_embeddings`` is not the peer's own patch module (conv, flatten,
    transpose) ``transformers.models.<module>.<name>``, or None."""
    patches = m._modules.get("patch_embeddings")
    peer = None if patches is None else model_class(type(patches), module, name)
    if peer is None:
        return f"patch_embeddings is {type(patches).__name__}, not {name}"
    return forward_problem(patches, peer) or conv_problem(patches._modules.get("projection"))


def embeddings_kind(module: str, name: str, mixin: type, conv: str = "patch_embedding",
                    norm: str | None = None) -> StemKind:  # fmt: skip
    """The kind of the embeddings class ``name`` of ``transformers.models.<module>`` fused by
    ``mixin``; its conv is ``patch_embeddings.projection`` (of the mixin's ``_zeta_patches``
    class), or the child ``conv``; the child ``norm``, if any, normalises its tokens."""

    def problem(m: nn.Module) -> str | None:
        peer = model_class(type(m), module, name)
        why = forward_problem(m, peer)
        for method in mixin._zeta_replaced:
            why = why or overrides(m, peer, method)
        if why is None and mixin._zeta_patches is not None:
            why = patch_module_problem(m, *mixin._zeta_patches)
        elif why is None:
            why = conv_problem(m._modules.get(conv))
        if why is None and norm is not None:
            why = norm_problem(m._modules.get(norm), m._modules[conv].out_channels)
            why = why and f"{norm}: {why}"
        return why

    def convert(m: nn.Module, backend: str) -> None:
        # Its patch conv, which runs when a call falls back (a mask token...), is converted by
        # fuse_patch_embeddings after the stems.
        swap(m, mixin, backend)

    def matches(m: nn.Module) -> bool:
        return model_class(type(m), module, name) is not None

    return StemKind(f"transformers {name}", matches, problem, convert)
