"""timm: the ``PatchEmbed`` family (a subclass of its own class, :func:`fused_timm_class`, with
the same checks, padding and output formats, projection and LayerNorm fused) and whole stems of
Vision Transformers (``VisionTransformer`` with class, register and distillation tokens,
``no_embed_class``, ``pre_norm``, ``dynamic_img_size``; DeiT distilled; the DINOv2 and ``*_reg4``
models): ``patch_embed`` -> ``_pos_embed`` -> ``patch_drop`` -> ``norm_pre`` in one fused call
(docs/design.md, "Whole stems").

timm's own ``forward_features`` and ``forward_intermediates`` run unchanged, inside a scope in
which the patch embedding computes the whole stem: prefix rows (``cls (+ pos[:P])``, registers,
distillation token), the position table (resampled by timm's own ``resample_abs_pos_embed`` for
``dynamic_img_size``) and ``norm_pre``. ``_pos_embed`` then passes that output on (through
``pos_drop`` if it changes it), and ``norm_pre`` returns it as it is (the hand-off of
zeta_fused.integrations._base).
With ``patch_drop`` active (training, ``patch_drop_rate > 0``) the stem makes its random draw,
as timm's ``PatchDropout`` makes it, and embeds only the patches kept; ``patch_drop`` then
returns the stem's output as it is. That needs ``pos_drop`` to leave the tensor as it is (eval,
a rate of 0, or no table); otherwise the full stem is fused and ``pos_drop``, ``patch_drop`` and
``norm_pre`` run after it, as in timm. Called outside those methods, ``patch_embed`` and
``_pos_embed`` behave as timm's.
"""

from __future__ import annotations

import operator
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .. import dispatch
from ..checks import check_input, pad_to_patch
from ..functional import fused_call
from ..nn.norms import norm_problem, norm_value
from ..nn.params import any_hook, bound, forward_of, param, plain
from ..op.args import NO_STEM, Stem
from . import _base
from .convs import conv_runs_itself, crop_to_grid, patch_conv_problem, to_format
from .timm_drop import draw_keep, hands_on, keeps_tensor, stem_draws

# --- PatchEmbed ---------------------------------------------------------------------------


def is_patch_embed(m: nn.Module) -> bool:
    """A timm ``PatchEmbed`` (or subclass); False when timm is not installed."""
    try:
        from timm.layers import PatchEmbed
    except ImportError:
        return False
    return isinstance(m, PatchEmbed)


def timm_format(m: nn.Module) -> str:
    return "NLC" if m.flatten else m.output_fmt.value


def timm_problem(m: nn.Module, cls: type) -> str | None:
    """Why a timm ``PatchEmbed`` of class ``cls`` cannot be fused, or None."""
    from timm.layers import PatchEmbed

    if cls.forward is not PatchEmbed.forward:
        return f"{cls.__name__} overrides PatchEmbed.forward"
    why = patch_conv_problem(m.proj)
    if why:
        return why
    if tuple(m.proj.kernel_size) != tuple(m.patch_size):
        return f"conv kernel {m.proj.kernel_size} != patch_size {m.patch_size}"
    if plain(m.norm, nn.Identity):
        return None
    why = norm_problem(m.norm, m.proj.out_channels)
    if why:
        return f"norm: {why}"
    if timm_format(m) not in ("NLC", "NHWC"):
        return f"a norm after output format {timm_format(m)} (not over the embedding dim)"
    return None


def _specialise(*sizes: int) -> None:
    """Under torch.compile: make the graph specific to these sizes (``operator.index`` turns a
    symbolic size into a constant, guarded). Where timm's ``PatchEmbed.forward`` checks the
    image size (a fixed size, or multiples of the patch without padding) it formats the size
    into its assertion messages, which does the same to timm's graph; a compiled fused stem
    gets the same graphs. (With symbolic sizes, the backward of the table's antialiased bicubic
    resampling for ``dynamic_img_size`` reaches a PyTorch bug.)"""
    for size in sizes:
        operator.index(size)


class FusedTimmPatchEmbed(dispatch.NotScriptable):
    """Mixed in front of a timm ``PatchEmbed`` class: the same checks, padding and output
    format, with projection and norm fused."""

    zeta_backend: str = "auto"
    _zeta_base: type  # the timm class converted from

    def _zeta_bound(self) -> tuple:
        """(why not fusable or None, hook tables), bound to the current proj and norm."""
        children = (self.proj, self.norm)
        return bound(self, "_zeta_binding", children, lambda: (
            timm_problem(self, self._zeta_base), dispatch.hook_dicts(*children)))  # fmt: skip

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_zeta_binding", None)  # bound to objects of this process: bound again on use
        return state

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickled as the timm class, converted again on load.
        return _base.rebuild_fused, (self._zeta_base, self.__getstate__(), fused_timm_class)

    @dispatch.traced_as_peer
    def forward(self, x: Tensor) -> Tensor:
        y = self.try_fused(x)
        return super().forward(x) if y is None else y  # timm's own forward, its own errors

    def try_fused(self, x: Tensor, stem: _base.StemParts | None = None,
                  keep: _base.Keep | None = None):  # fmt: skip
        """The fused output in timm's output format, or None when timm's forward must run.
        ``stem(grid)``: the rest of a whole stem (below), output (B, P + N, D); None from it:
        the stem cannot be fused for this input. ``keep(grid)``: the (B, L) patches it embeds
        (output (B, P + L, D)), drawn once the call runs fused."""
        why, hooks = self._zeta_bound()
        proj, norm = self.proj, self.norm
        is_norm, fmt = not plain(norm, nn.Identity), timm_format(self)
        if (
            why is not None
            or any(hooks)
            or patch_conv_problem(proj) is not None  # its stride, padding... may change in place
            or (is_norm and fmt not in ("NLC", "NHWC"))  # a norm over another axis: eager
            or (is_norm and norm_problem(norm, proj.out_channels) is not None)
            or conv_runs_itself(x, self.patch_size)
            or not dispatch.use_fused(self.zeta_backend, x)
        ):
            return None
        height, width = x.shape[-2:]
        ph, pw = self.patch_size
        if self.img_size is not None:
            wrong_size = self.strict_img_size and (height, width) != tuple(self.img_size)
            ragged = not self.dynamic_img_pad and (height % ph or width % pw)
            if wrong_size or (ragged and not self.strict_img_size):
                return None  # timm raises its own error
            if torch.compiler.is_compiling() and (self.strict_img_size or not self.dynamic_img_pad):
                _specialise(height, width)
        if self.dynamic_img_pad:
            x = pad_to_patch(x, (ph, pw))
        x = crop_to_grid(x, (ph, pw))
        check_input(x, proj.in_channels, (ph, pw), False)
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        parts = NO_STEM
        if stem is not None:
            parts = stem(grid)
            if parts is None:
                return None
        weight, bias = param(proj, "weight"), param(proj, "bias")
        shape = (proj.out_channels, proj.in_channels, ph, pw)
        post = norm_value(norm, x.dtype) if is_norm else None
        ids = None if keep is None else keep(grid)
        y = fused_call(x, (ph, pw), weight, shape, bias, None, post, parts, ids)
        if y is None:
            return None
        return y if stem is not None else to_format(y, x, (ph, pw), fmt)


_FUSED_CLASSES: dict[type, type] = {}


def fused_timm_class(cls: type) -> type:
    """The fused subclass of a timm ``PatchEmbed`` class (one per class)."""
    if cls not in _FUSED_CLASSES:
        attrs = {"_zeta_base": cls, "__module__": __name__}
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedTimmPatchEmbed, cls), attrs)
    return _FUSED_CLASSES[cls]


# --- Whole stems ---------------------------------------------------------------------------


_TIMM_CLASSES: tuple[type, type] | None = None  # imported once: _timm() is on the per-call path


def _timm():
    global _TIMM_CLASSES
    if _TIMM_CLASSES is None:
        from timm.models import deit, vision_transformer

        _TIMM_CLASSES = vision_transformer.VisionTransformer, deit.VisionTransformerDistilled
    return _TIMM_CLASSES


def _prefix_tokens(m: nn.Module) -> list[Tensor]:
    """The (1, n, D) prefix parameters in timm's concatenation order."""
    _, distilled = _timm()
    second = "dist_token" if isinstance(m, distilled) else "reg_token"
    names = ("cls_token", second)
    return [t for t in (param(m, n) for n in names) if t is not None]


class _FusedTimmViT(_base.FusedStem):
    """Mixed in front of a timm VisionTransformer class: its feature methods run their own
    code, with the stem fused where the call allows it."""

    @dispatch.traced_as_peer
    def forward_features(self, x: Tensor, *args, **kwargs):
        with self._zeta_scope(x):
            return super().forward_features(x, *args, **kwargs)

    @dispatch.traced_as_peer
    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        with self._zeta_scope(x):
            return super().forward_intermediates(x, *args, **kwargs)

    @dispatch.traced_as_peer
    def _pos_embed(self, x: Tensor) -> Tensor:
        state = _base.call_state(self)
        if state is not None and x is state.pop("out", None):  # the whole stem ran fused
            # timm applies pos_drop only with a table. The hand-offs to patch_drop and norm_pre
            # need the stem's output itself: one that keeps it is not called
            # (timm_drop.hands_on).
            drop = self.pos_drop
            keeps = keeps_tensor(drop) and not any_hook(self, "_zeta_pos_drop_hooks", drop)
            return x if self.pos_embed is None or keeps else drop(x)
        return super()._pos_embed(x)

    def _zeta_scope(self, x: Tensor):
        """The scope of one feature call: the patch embedding may compute the whole stem."""
        pe = self.patch_embed
        # The patch embedding's own hooks would see the whole stem: then it stays a patch
        # embedding for this call. A forward set on the patch embedding's instance (which may
        # change its output), or a _pos_embed set on this one, would receive the stem's output:
        # then timm's code runs as it is.
        if (
            not isinstance(pe, _TimmStemPatchEmbed)
            or forward_of(pe) is not type(pe).forward
            or "_pos_embed" in self.__dict__
            or not self.zeta_fusable(x, pe)
        ):
            return nullcontext()
        # timm applies pos_drop only with a table. Token dropping joins the stem when pos_drop
        # leaves the tensor as it is (otherwise it drops from the tokens pos_drop changed);
        # norm_pre when nothing else between the stem and it changes the tensor.
        drop = self.patch_drop
        between = (drop,) if self.pos_embed is None else (self.pos_drop, drop)
        if any_hook(self, "_zeta_between_hooks", *between):
            return _base.handoff_scope(self, pe, None)
        pos_keeps = all(map(keeps_tensor, between[:-1]))
        prefix_rows = sum(t.shape[1] for t in _prefix_tokens(self))
        if not (pos_keeps and stem_draws(drop, prefix_rows)):
            drop = None
        fuse_norm = drop is not None or (pos_keeps and hands_on(self.patch_drop))
        return _base.handoff_scope(self, pe, self.norm_pre if fuse_norm else None, drop)

    def stem_parts(self, grid: tuple[int, ...], norm: nn.Module | None) -> Stem | None:
        """The rest of the stem for a patch grid, as timm's ``_pos_embed`` computes it, then
        ``norm`` (``norm_pre`` handed off, or None); None when timm would not accept the table
        (timm then raises its own error)."""
        # The (1, n, D) parameters and table as (n, D) rows through views (squeeze, split),
        # whose backward costs no kernel or one concatenation, where indexing would fill a
        # zero tensor per index and copy into it on every backward.
        tokens = _prefix_tokens(self)
        if any(t.shape[0] != 1 for t in tokens):
            return None  # timm's own code decides what such a token means
        n_prefix = sum(t.shape[1] for t in tokens)
        rows = [t.squeeze(0) for t in tokens]
        prefix = torch.cat(rows) if len(rows) > 1 else (rows[0] if rows else None)
        pos = param(self, "pos_embed")
        if pos is not None:
            covers_prefix = not self.no_embed_class
            if self.dynamic_img_size:
                from timm.layers import resample_abs_pos_embed

                # Resampled on every call, as timm does: a cache could not see every update
                # of the table (through .data, by fused optimizers) nor inference mode.
                old, skip = tuple(self.patch_embed.grid_size), n_prefix if covers_prefix else 0
                pos = resample_abs_pos_embed(pos, new_size=grid, old_size=old,
                                             num_prefix_tokens=skip)  # fmt: skip
            if pos.shape[0] != 1 or pos.shape[1] != grid[0] * grid[1] + (
                n_prefix if covers_prefix else 0
            ):
                return None
            pos = pos.squeeze(0)
            if covers_prefix and n_prefix:
                prefix_pos, pos = pos.split((n_prefix, pos.shape[0] - n_prefix))
                prefix = prefix + prefix_pos
        return Stem(
            pos, prefix, norm_value(norm, self.patch_embed.proj.weight.dtype) if norm else None
        )


class _TimmStemPatchEmbed:
    """Mixed in front of a fused timm PatchEmbed: inside its owner's feature call it computes
    the whole stem (B, P + N, D); anywhere else it is the fused PatchEmbed."""

    @dispatch.traced_as_peer
    def forward(self, x: Tensor) -> Tensor:
        state = _base.call_state(self)
        if state is None:
            return super().forward(x)
        # Read once: the norm the op applies is the one handed off.
        norm = _base.pending_norm(self, self.proj.out_channels)
        drop, keep = state.get("drop"), None
        if drop is not None:

            def keep(grid: tuple[int, ...]) -> Tensor:
                # Recorded at once: should the op not run after all, the drop keeps these.
                ids = draw_keep(drop, x, grid[0] * grid[1])
                state["drawn"] = (None, drop.num_prefix_tokens, ids)
                return ids

        y = self.try_fused(x, lambda grid: state["owner"].stem_parts(grid, norm), keep)
        if y is None:
            return super().forward(x)
        if norm is not None:
            _base.hand_off(norm, y)
        if drop is not None:  # patch_drop returns y as it is
            state["drawn"] = (y, *state["drawn"][1:])
        state["out"] = y  # for the owner's _pos_embed
        return y

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickled as timm's class, made stem-capable on load.
        return _base.rebuild_fused, (self._zeta_base, self.__getstate__(), _stem_patch_embed_class)


_PE_CLASSES: dict[type, type] = {}


def _stem_patch_embed_class(cls: type) -> type:
    """The stem-capable fused subclass of a timm PatchEmbed class (one per class)."""
    if cls not in _PE_CLASSES:
        base = fused_timm_class(cls)
        _PE_CLASSES[cls] = type(
            f"FusedStem{cls.__name__}", (_TimmStemPatchEmbed, base), {"__module__": __name__}
        )
    return _PE_CLASSES[cls]


def _matches(m: nn.Module) -> bool:
    try:
        vit, _ = _timm()
    except ImportError:
        return False
    return isinstance(m, vit)


def _problem(m: nn.Module) -> str | None:
    vit, distilled = _timm()
    own = type(m)._pos_embed
    if own not in (vit._pos_embed, distilled._pos_embed):
        return f"{type(m).__name__} overrides _pos_embed"
    # A class with its own feature methods (the MAE repository's models_vit.py) builds the
    # stem itself around patch_embed: only the patch embedding can be fused there.
    why = _base.overrides(m, vit, "forward_features") or _base.overrides(
        m, vit, "forward_intermediates"
    )
    if why is not None:
        return f"{why} (its own stem code): only its patch embedding is fused"
    pe = m.patch_embed
    base = getattr(pe, "_zeta_base", type(pe))
    why = timm_problem(pe, base) if hasattr(pe, "proj") else "no timm PatchEmbed"
    if why is not None:
        return f"patch_embed: {why}"
    return None


def _convert(m: nn.Module, backend: str) -> None:
    pe = m.patch_embed
    base = getattr(pe, "_zeta_base", type(pe))
    pe.__class__ = _stem_patch_embed_class(base)
    pe.zeta_backend = backend
    _base.handoff_class(m.norm_pre)
    from timm.layers import PatchDropout

    _base.handoff_drop_class(m.patch_drop, PatchDropout)
    _base.swap(m, _FusedTimmViT, backend)


STEM_KINDS = (_base.StemKind("timm VisionTransformer", _matches, _problem, _convert),)
