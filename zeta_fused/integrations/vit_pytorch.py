"""Whole stems of vit-pytorch, OpenCLIP and Segment Anything (see :mod:`zeta_fused.stems`);
diffusers' ``PatchEmbed`` lives in :mod:`zeta_fused.stems_diffusion`, imported from here.

- vit-pytorch ``ViT``: ``to_patch_embedding``, the class token, ``pos_embedding[:seq]``
  (the model's forward, overridden: the stem is inline in it); ``SimpleViT``: its sincos
  ``pos_embedding`` table added to the tokens.
- OpenCLIP ``VisionTransformer``: ``_embeds`` (conv1, class and position embeddings, then
  ``ln_pre``, fused while ``patch_dropout`` does nothing for the call; with patch dropout active,
  or a hook on either, the two run on the fused tokens).
- Segment Anything ``ImageEncoderViT``: ``patch_embed`` (NHWC) plus ``pos_embed``.

Every fused method takes the peer's arguments and runs the peer's own code for any call it
cannot compute exactly: a hook on a child it would not call, an input the peer would reject or
treat otherwise (its own error then), a position table of another size, a child replaced by one
that cannot be fused.
"""

from __future__ import annotations

import math
import sys

from torch import Tensor, nn

from .. import dispatch
from ..checks import check_stem, checked_params
from ..functional import fused_dtypes, op_inputs
from ..nn.patch_embed import (
    SequentialPlan,
    _param,
    norm_params,
    norms_problem,
    parse_patch_sequential,
    plain,
    plan_eps,
)
from ..op.reference import Stem
from . import _base as stems
from ._base import FusedStem, StemKind, conv_stem, norm_of, register, swap
from .convs import patch_conv_problem


def peer_class(module: str, name: str) -> type | None:
    """A peer's class if its module is imported already (a model of it exists only then), so
    recognising modules never imports a peer library."""
    return getattr(sys.modules.get(module), name, None)


def overrides(m: nn.Module, cls: type, method: str) -> str | None:
    """Why ``m``'s class is not ``cls`` as far as ``method`` goes (a subclass overriding it
    computes something else), or None."""
    if getattr(type(m), method) is not getattr(cls, method):
        return f"{type(m).__name__} overrides {cls.__name__}.{method}"
    return None


# --- vit-pytorch ---------------------------------------------------------------------------

_VIT_ATTRS = ("to_patch_embedding", "cls_token", "pos_embedding", "dropout", "transformer",
              "pool", "to_latent", "mlp_head")  # fmt: skip
_SIMPLE_VIT_ATTRS = ("to_patch_embedding", "pos_embedding", "transformer", "to_latent",
                     "linear_head")  # fmt: skip


def _plan_problem(plan: SequentialPlan) -> str | None:
    """Why a parsed ``to_patch_embedding`` does not compute what one fused call does."""
    if not plan.pattern.flat:
        return "its Rearrange does not give (B, N, K) tokens in grid order"
    return norms_problem(plan)


def _read_plan(seq: nn.Module) -> tuple[SequentialPlan | None, str | None]:
    """A ``to_patch_embedding`` read: (plan, None), or (None, why it is not fused)."""
    if not isinstance(seq, nn.Sequential):
        return None, f"to_patch_embedding is a {type(seq).__name__}, not a Sequential"
    plan, why = parse_patch_sequential(seq)
    why = why or _plan_problem(plan)
    return (None, f"to_patch_embedding: {why}") if why else (plan, None)


def _patch_plan(owner: nn.Module) -> SequentialPlan | None:
    """The fused owner's ``to_patch_embedding`` plan (None: not fusable), bound to its current
    children: read again when one is replaced, appended or deleted."""
    seq = owner.to_patch_embedding
    children = tuple(seq._modules.values())
    bound = owner.__dict__.get("_zeta_plan")
    if bound is None or bound[0] is not seq or bound[1] != children:
        bound = (seq, children, _read_plan(seq)[0])
        owner.__dict__["_zeta_plan"] = bound  # the instance dict: not pickled (FusedStem)
    return bound[2]


def _sequential_stem(owner: nn.Module, img: Tensor, stem_of) -> Tensor | None:
    """``to_patch_embedding`` and what ``stem_of(img, tokens, dim, token_dtype)`` adds (a Stem,
    or None when the peer must run) as one fused call: (B, P + N, D). None: run the peer's
    code (it raises its own errors for inputs it rejects)."""
    plan = _patch_plan(owner)
    if plan is None:
        return None
    seq = owner.to_patch_embedding
    patch = plan.pattern.patch
    if (
        img.ndim != len(patch) + 2
        or img.shape[1] != plan.dim_in
        or not img.is_floating_point()
        or any(s % p for s, p in zip(img.shape[2:], patch, strict=True))
        or getattr(seq, "dynamic_img_pad", False)  # a FusedPatchSequential that pads
        or norms_problem(plan) is not None  # an eps or size changed in place
        or not owner.zeta_fusable(img, seq, *seq._modules.values())
    ):
        return None
    ln1, proj, ln2 = plan.ln1, plan.proj, plan.ln2
    eps = plan_eps(plan)
    weight, dim = _param(proj, "weight"), proj.out_features
    bias, pre, post = checked_params(img, weight, (dim, plan.patch_dim), _param(proj, "bias"),
                                     norm_params(ln1), norm_params(ln2))  # fmt: skip
    tokens = math.prod(s // p for s, p in zip(img.shape[2:], patch, strict=True))
    # What to_patch_embedding would return has this dtype (autocast decides it for a norm).
    parts = stem_of(img, tokens, dim, fused_dtypes(img, weight, post is not None)[1])
    if parts is None:
        return None
    parts = check_stem(img, patch, dim, parts.pos, parts.prefix, parts.norm, parts.eps)
    return stems.fused_patch_embed(op_inputs(img, patch, weight, bias, pre, post, eps, parts))


class _FusedViT(FusedStem):
    """vit-pytorch ``ViT`` with the stem (patches, class token, position rows) fused."""

    def _zeta_stem(self, _img: Tensor, tokens: int, dim: int, _token_dtype) -> Stem | None:
        # The peer adds its parameters as they are (cat and + promote): no cast here.
        # (P, D) tokens and an (L, D) table; (1, 1, D) and (1, L, D) in older releases.
        cls, table = _param(self, "cls_token"), _param(self, "pos_embedding")
        if cls.shape[-1] != dim or table.shape[-1] != dim:
            return None
        cls, table = cls.reshape(-1, dim), table.reshape(-1, dim)
        n_prefix = cls.shape[0]
        if table.shape[0] < n_prefix + tokens:  # pos_embedding[:seq] would not broadcast
            return None
        # The peer adds pos_embedding[:seq] to cat(cls, tokens): the first rows to the prefix.
        # An empty (0, D) class token (mean pooling) stays in: its gradient is an empty one.
        prefix = cls + table[:n_prefix]
        return Stem(table[n_prefix : n_prefix + tokens], prefix, None, 1e-5)

    def forward(self, img: Tensor) -> Tensor:
        x = _sequential_stem(self, img, self._zeta_stem)
        if x is None:
            return super().forward(img)
        # The rest of ViT.forward, as the peer writes it.
        x = self.dropout(x)
        x = self.transformer(x)
        if self.mlp_head is None:
            return x
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        x = self.to_latent(x)
        return self.mlp_head(x)


class _FusedSimpleViT(FusedStem):
    """vit-pytorch ``SimpleViT`` with the patches and the sincos table fused."""

    def _zeta_stem(self, img: Tensor, tokens: int, dim: int, token_dtype) -> Stem | None:
        table = self.pos_embedding  # a plain tensor attribute, made for the model's image size
        if not isinstance(table, Tensor) or table.shape != (tokens, dim):
            return None  # the peer's in-place add would not broadcast: its own error
        return Stem(table.to(img.device, dtype=token_dtype), None, None, 1e-5)

    def forward(self, img: Tensor) -> Tensor:
        x = _sequential_stem(self, img, self._zeta_stem)
        if x is None:
            return super().forward(img)
        # The rest of SimpleViT.forward, as the peer writes it.
        x = self.transformer(x)
        x = x.mean(dim=1)
        x = self.to_latent(x)
        return self.linear_head(x)


def _vit_pytorch_problem(m: nn.Module, cls: type, attrs: tuple[str, ...]) -> str | None:
    why = overrides(m, cls, "forward")
    if why:
        return why
    missing = [a for a in attrs if not hasattr(m, a)]
    if missing:
        return f"no {', '.join(missing)}: not the {cls.__name__}.forward this converter knows"
    return _read_plan(m.to_patch_embedding)[1]


def _vit_problem(m: nn.Module) -> str | None:
    why = _vit_pytorch_problem(m, peer_class("vit_pytorch.vit", "ViT"), _VIT_ATTRS)
    if why is None and not all(isinstance(t, Tensor) for t in (m.cls_token, m.pos_embedding)):
        why = "cls_token or pos_embedding is not a tensor"
    return why


def _simple_vit_problem(m: nn.Module) -> str | None:
    cls = peer_class("vit_pytorch.simple_vit", "SimpleViT")
    why = _vit_pytorch_problem(m, cls, _SIMPLE_VIT_ATTRS)
    if why is None and not isinstance(m.pos_embedding, Tensor):
        why = "pos_embedding is not a tensor"
    return why


def _swapper(mixin: type):
    """A StemKind's convert: the class swap to ``mixin``'s fused class."""
    return lambda m, backend: swap(m, mixin, backend)


def _is_instance(module: str, name: str):
    def matches(m: nn.Module) -> bool:
        cls = peer_class(module, name)
        return cls is not None and isinstance(m, cls)

    return matches


register(StemKind("vit-pytorch ViT", _is_instance("vit_pytorch.vit", "ViT"), _vit_problem,
                  _swapper(_FusedViT)))  # fmt: skip
register(StemKind("vit-pytorch SimpleViT", _is_instance("vit_pytorch.simple_vit", "SimpleViT"),
                  _simple_vit_problem, _swapper(_FusedSimpleViT)))  # fmt: skip


# --- OpenCLIP ------------------------------------------------------------------------------

_OPEN_CLIP = "open_clip.transformer"


def _patch_dropout_off(drop: nn.Module) -> bool:
    """OpenCLIP's patch dropout returns its input as it is in this call."""
    if plain(drop, nn.Identity):
        return True
    cls = peer_class(_OPEN_CLIP, "PatchDropout")
    return plain(drop, cls) and (not drop.training or drop.prob == 0.0)


def _clip_norm_casts(norm: nn.Module, dim: int) -> bool | None:
    """For a LayerNorm over ``dim`` the op computes: whether it casts its output back to its
    input's dtype (OpenCLIP's ``LayerNorm`` and ``LayerNormFp32`` do); None for any other."""
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (dim,):
        return None
    if type(norm).forward is nn.LayerNorm.forward:
        return False
    casting = [peer_class(_OPEN_CLIP, name) for name in ("LayerNorm", "LayerNormFp32")]
    return True if any(c is not None and plain(norm, c) for c in casting) else None


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
        cls, table = _param(self, "class_embedding"), _param(self, "positional_embedding")
        tokens = (x.shape[2] // ph) * (x.shape[3] // pw)
        if cls.shape != (dim,) or table.shape != (tokens + 1, dim):
            return super()._embeds(x)  # the peer's add would not broadcast: its own error
        # The peer casts both to the conv output's dtype before adding them.
        token_dtype = fused_dtypes(x, _param(conv, "weight"), False)[1]
        table = table.to(token_dtype)
        prefix = (cls.to(token_dtype) + table[0]).unsqueeze(0)
        stem_norm, eps = (None, 1e-5) if casts is None else (norm_of(norm), norm.eps)
        y = conv_stem(x, conv, lambda _: Stem(table[1:], prefix, stem_norm, eps))
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


register(StemKind("OpenCLIP VisionTransformer", _is_instance(_OPEN_CLIP, "VisionTransformer"),
                  _open_clip_problem, _swapper(_FusedOpenClipViT)))  # fmt: skip


# --- Segment Anything ----------------------------------------------------------------------

_SAM = "segment_anything.modeling.image_encoder"


class _FusedSamImageEncoder(FusedStem):
    """Segment Anything ``ImageEncoderViT`` with patch_embed and pos_embed fused: the op's
    (B, N, D) tokens viewed as the peer's (B, Hp, Wp, D)."""

    def _zeta_tokens(self, x: Tensor) -> Tensor | None:
        embed = self.patch_embed
        if x.ndim != 4 or type(embed).forward is not peer_class(_SAM, "PatchEmbed").forward:
            return None
        conv = embed.proj
        if patch_conv_problem(conv) is not None or not self.zeta_fusable(x, embed, conv):
            return None  # (a proj replaced or changed in place: the peer's code)
        grid = (x.shape[2] // conv.kernel_size[0], x.shape[3] // conv.kernel_size[1])
        pos = _param(self, "pos_embed")  # (1, Hp, Wp, D) or None
        if pos is not None:
            if pos.ndim != 4 or tuple(pos.shape[:3]) != (1, *grid):
                return None  # another grid: the peer broadcasts it or raises
            pos = pos.flatten(0, 2)
        y = conv_stem(x, conv, lambda _: Stem(pos, None, None, 1e-5))
        return None if y is None else y.view(y.shape[0], *grid, y.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        tokens = self._zeta_tokens(x)
        if tokens is None:
            return super().forward(x)
        # The rest of ImageEncoderViT.forward, as the peer writes it.
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.neck(tokens.permute(0, 3, 1, 2))


def _sam_problem(m: nn.Module) -> str | None:
    embed = getattr(m, "patch_embed", None)
    why = overrides(m, peer_class(_SAM, "ImageEncoderViT"), "forward")
    if why is None and embed is not None:
        why = overrides(embed, peer_class(_SAM, "PatchEmbed"), "forward")
    if why is None:
        why = patch_conv_problem(embed.proj) if embed is not None else "no patch_embed"
    return why


register(StemKind("Segment Anything ImageEncoderViT", _is_instance(_SAM, "ImageEncoderViT"),
                  _sam_problem, _swapper(_FusedSamImageEncoder)))  # fmt: skip
