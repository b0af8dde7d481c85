"""vit-pytorch: whole stems of ``ViT`` (``to_patch_embedding``, the class token,
``pos_embedding[:seq]``; the model's forward, overridden: the stem is inline in it) and
``SimpleViT`` (its sincos ``pos_embedding`` table added to the tokens); the conversion of a bare
``to_patch_embedding`` is ``FusedPatchSequential.fuse_in_place`` (zeta_fused/nn/patch_embed.py).

Every fused method takes the peer's arguments and runs the peer's own code for any call it
cannot compute exactly: a hook on a child it would not call, an input the peer would reject or
treat otherwise (its own error then), a position table of another size, a child replaced by one
that cannot be fused.
"""

from __future__ import annotations

import math

from einops.layers.torch import Rearrange
from torch import Tensor, nn

from .. import dispatch
from ..functional import fused_call, fused_dtypes
from ..nn.params import bound, forward_of, param
from ..nn.patch_embed import (
    FusedPatchSequential,
    SequentialPlan,
    norms_problem,
    parse_patch_sequential,
    plan_norms,
)
from ..op.args import Stem
from ._base import FusedStem, StemKind, is_instance, overrides, peer_class, swapper
from .convs import patch_grid

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
    if forward_of(seq) not in (nn.Sequential.forward, FusedPatchSequential.forward):
        return None, f"to_patch_embedding ({type(seq).__name__}) has a forward of its own"
    plan, why = parse_patch_sequential(seq)
    why = why or _plan_problem(plan)
    return (None, f"to_patch_embedding: {why}") if why else (plan, None)


def _patch_plan(owner: nn.Module) -> SequentialPlan | None:
    """The fused owner's ``to_patch_embedding`` plan (None: not fusable), bound to its current
    children: read again when one is replaced, appended or deleted."""
    seq = owner.to_patch_embedding
    children = (seq, *seq._modules.values())
    return bound(owner, "_zeta_plan", children, lambda: _read_plan(seq)[0])


class _FusedVitPytorch(FusedStem):
    """A vit-pytorch model whose forward begins with the stem: the stem fused
    (:meth:`_zeta_stem` gives what the model adds to the patch tokens), then the rest of the
    peer's forward (:meth:`_zeta_rest`), written as the peer writes it."""

    @dispatch.traced_as_peer
    def forward(self, img: Tensor) -> Tensor:
        x = self.try_fused(img)
        return super().forward(img) if x is None else self._zeta_rest(x)

    def try_fused(self, img: Tensor) -> Tensor | None:
        """``to_patch_embedding`` and what :meth:`_zeta_stem` adds as one fused call:
        (B, P + N, D). None: run the peer's code (it raises its own errors for inputs it
        rejects)."""
        plan = _patch_plan(self)
        if plan is None:
            return None
        seq = self.to_patch_embedding
        patch = plan.pattern.patch
        if (
            img.ndim != len(patch) + 2
            or img.shape[1] != plan.dim_in
            or not img.is_floating_point()
            or any(s % p for s, p in zip(img.shape[2:], patch, strict=True))
            or getattr(seq, "dynamic_img_pad", False)  # a FusedPatchSequential that pads
            or norms_problem(plan) is not None  # a norm's size changed in place
            or not self.zeta_fusable(img, seq, *seq._modules.values())
        ):
            return None
        proj = plan.proj
        weight, dim = param(proj, "weight"), proj.out_features
        pre, post = plan_norms(plan, img.dtype)
        tokens = math.prod(patch_grid(img, patch))
        # What to_patch_embedding would return has this dtype (autocast decides it for a norm).
        parts = self._zeta_stem(img, tokens, dim, fused_dtypes(img, weight, post is not None)[1])
        if parts is None:
            return None
        shape = (dim, plan.patch_dim)
        return fused_call(img, patch, weight, shape, param(proj, "bias"), pre, post, parts)


class _FusedViT(_FusedVitPytorch):
    """vit-pytorch ``ViT`` with the stem (patches, class token, position rows) fused."""

    def _zeta_stem(self, _img: Tensor, tokens: int, dim: int, _token_dtype) -> Stem | None:
        # The peer adds its parameters as they are (cat and + promote): no cast here.
        # (P, D) tokens and an (L, D) table; (1, 1, D) and (1, L, D) in older releases.
        cls, table = param(self, "cls_token"), param(self, "pos_embedding")
        if cls.shape[-1] != dim or table.shape[-1] != dim:
            return None
        cls, table = cls.reshape(-1, dim), table.reshape(-1, dim)
        n_prefix = cls.shape[0]
        if table.shape[0] < n_prefix + tokens:  # pos_embedding[:seq] would not broadcast
            return None
        # The peer adds pos_embedding[:seq] to cat(cls, tokens): the first rows to the prefix.
        # An empty (0, D) class token (mean pooling) stays in: its gradient is an empty one.
        prefix = cls + table[:n_prefix]
        return Stem(table[n_prefix : n_prefix + tokens], prefix, None)

    def _zeta_rest(self, x: Tensor) -> Tensor:
        """The rest of ``ViT.forward``."""
        x = self.dropout(x)
        x = self.transformer(x)
        if self.mlp_head is None:
            return x
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        x = self.to_latent(x)
        return self.mlp_head(x)


class _FusedSimpleViT(_FusedVitPytorch):
    """vit-pytorch ``SimpleViT`` with the patches and the sincos table fused."""

    def _zeta_stem(self, img: Tensor, tokens: int, dim: int, token_dtype) -> Stem | None:
        table = self.pos_embedding  # a plain tensor attribute, made for the model's image size
        if not isinstance(table, Tensor) or table.shape != (tokens, dim):
            return None  # the peer's in-place add would not broadcast: its own error
        return Stem(table.to(img.device, dtype=token_dtype), None, None)

    def _zeta_rest(self, x: Tensor) -> Tensor:
        """The rest of ``SimpleViT.forward``."""
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


def is_patch_sequential(m: nn.Module) -> bool:
    """A plain Sequential starting with a Rearrange that cuts patches (it names their sizes):
    vit-pytorch's ``to_patch_embedding``."""
    if type(m) is not nn.Sequential or len(m) == 0:
        return False
    first = next(iter(m.children()))
    return isinstance(first, Rearrange) and bool(first.axes_lengths)


STEM_KINDS = (
    StemKind("vit-pytorch ViT", is_instance("vit_pytorch.vit", "ViT"), _vit_problem,
             swapper(_FusedViT)),
    StemKind("vit-pytorch SimpleViT", is_instance("vit_pytorch.simple_vit", "SimpleViT"),
             _simple_vit_problem, swapper(_FusedSimpleViT)),
)  # fmt: skip
