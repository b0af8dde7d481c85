"""``PatchEmbeddings``: zeta's documented module, fused on CUDA, eager everywhere else.

Its ``embedding`` is a :class:`FusedPatchSequential`: vit-pytorch's ``to_patch_embedding``
Sequential (Rearrange, norm?, Linear, norm?; each norm a LayerNorm or an RMSNorm) whose forward
runs the fused op when the backend allows and is literally the Sequential otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from .. import dispatch
from ..checks import (
    PatchSize,
    as_int,
    check_input,
    check_params,
    pad_to_patch,
    resolve_patch_size,
)
from ..functional import fused_call
from ..op.args import NO_STEM, Stem
from ..op.layout import PatchPattern, parse_patchify
from ..op.reference import PATCHIFY
from .norms import norm_kind, norm_problem, norm_value
from .params import bound, forwarded, param, plain, raw_params


class SequentialPlan(NamedTuple):
    """What a fusable patch-embedding Sequential computes, bound to its children."""

    norm1: nn.Module | None  # a LayerNorm or RMSNorm over K
    proj: nn.Linear
    norm2: nn.Module | None  # over D
    pattern: PatchPattern  # its Rearrange, read
    dim_in: int
    patch_dim: int  # K
    hooks: tuple[dict, ...]  # dispatch.hook_dicts of every child


# Where the norms and the Linear sit among the layers after the Rearrange (Identity layers,
# vit-pytorch's "no norm", left out): (norm1, proj, norm2) indices.
_LAYOUTS = {
    ("Linear",): (None, 0, None),
    ("Norm", "Linear"): (0, 1, None),
    ("Linear", "Norm"): (None, 0, 1),
    ("Norm", "Linear", "Norm"): (0, 1, 2),
}


def _class_name(m: nn.Module) -> str:
    """A layer's class, by its full name outside torch.nn: a quantized "Linear" is not one."""
    cls = type(m)
    if cls.__module__.startswith("torch.nn."):
        return cls.__name__
    return f"{cls.__module__}.{cls.__name__}"


def parse_patch_sequential(layers: nn.Sequential) -> tuple[SequentialPlan | None, str | None]:
    """Read a vit-pytorch patch-embedding Sequential of any spatial rank (a patchifying
    Rearrange, then norm?, Linear, norm?, nn.Identity in a norm's place; each norm a LayerNorm
    or RMSNorm, :mod:`.norms`); returns (plan, None), or (None, why it cannot be fused)."""
    mods = list(layers._modules.values())
    first = mods[0] if mods else None
    if not isinstance(first, Rearrange):
        return None, "first layer is not a Rearrange"
    pattern = parse_patchify(" ".join(first.pattern.split()), tuple(first.axes_lengths.items()))
    if isinstance(pattern, str):
        return None, f"Rearrange {first.pattern!r}: {pattern}"
    rest = [m for m in mods[1:] if not plain(m, nn.Identity)]  # Identity: no norm
    # Any other class is "other", whatever its name (quantize_dynamic's Linear is "Linear" too).
    kinds = tuple("Norm" if norm_kind(m) else "Linear" if plain(m, nn.Linear) else "other"
                  for m in rest)  # fmt: skip
    if kinds not in _LAYOUTS:
        names = [_class_name(m) for m in mods[1:]]
        return None, f"layers after Rearrange are {names}, not norm?, Linear, norm?"
    norm1, proj, norm2 = (None if i is None else rest[i] for i in _LAYOUTS[kinds])
    pixels = math.prod(pattern.patch)
    if proj.in_features % pixels:
        return None, f"Linear in_features {proj.in_features} is not a multiple of {pixels}"
    plan = SequentialPlan(norm1, proj, norm2, pattern, proj.in_features // pixels,
                          proj.in_features, dispatch.hook_dicts(*mods))  # fmt: skip
    return plan, None


def _patch_order_view(x: Tensor, pattern: PatchPattern) -> tuple[Tensor, tuple[int, ...]]:
    """The input with its spatial dimensions in the order of the Linear's patch axes (a view),
    and the patch in that order: the kernels' K order is (*patch, c)."""
    order = pattern.order
    if pattern.in_order:
        return x, pattern.patch
    return x.permute(0, 1, *[2 + d for d in order]), tuple([pattern.patch[d] for d in order])


def _tokens_as(y: Tensor, x: Tensor, pattern: PatchPattern) -> Tensor:
    """(B, N, D) tokens, in the grid order of the permuted input, laid out as the pattern's
    output (not ``pattern.flat``): its grid dimensions in the input's order, grouped as it
    groups them."""
    grid = [s // p for s, p in zip(x.shape[2:], pattern.patch, strict=True)]
    order, groups = pattern.order, pattern.groups
    tokens = y.view(y.shape[0], *[grid[d] for d in order], y.shape[-1])
    tokens = tokens.permute(0, *[1 + order.index(d) for d in range(len(order))], len(order) + 1)
    sizes = [math.prod([grid[d] for d in g]) for g in groups]
    return tokens.reshape(y.shape[0], *sizes, y.shape[-1])


def norms_problem(plan: SequentialPlan) -> str | None:
    """Why the plan's norms are not what one fused call computes (checked per call: a norm's
    size may change in place), or None."""
    for norm, size in ((plan.norm1, plan.patch_dim), (plan.norm2, plan.proj.out_features)):
        if norm is not None and (why := norm_problem(norm, size)) is not None:
            return why
    return None


def plan_norms(plan: SequentialPlan, dtype: torch.dtype) -> tuple:
    """The plan's norms as the op's values, read now, for an input of ``dtype``."""
    return norm_value(plan.norm1, dtype), norm_value(plan.norm2, dtype)


class FusedPatchSequential(dispatch.NotScriptable, nn.Sequential):
    """A vit-pytorch patch-embedding Sequential with a fused forward (same children, same
    state-dict keys). Build it from layers, or convert an existing Sequential in place with
    :meth:`fuse_in_place`.

    Its children are read again whenever they change (a layer replaced, appended or deleted,
    a slice taken): a layout that cannot be fused, a child with hooks, or a context the fused
    op does not support (docs/design.md, "Drop-in rule") runs the plain Sequential for that
    call. ``why_not_fused`` says why the current children cannot be fused (None if they can).
    """

    def __init__(self, *layers, dynamic_img_pad: bool = False, backend: str = "auto"):
        super().__init__(*layers)
        self.dynamic_img_pad = dynamic_img_pad
        self.backend = dispatch.check_backend(backend)

    @classmethod
    def fuse_in_place(cls, seq: nn.Sequential, backend: str = "auto") -> str | None:
        """Turn ``seq`` into this class (same object); returns why not, or None when done."""
        why = parse_patch_sequential(seq)[1]
        if why is None:
            seq.__class__ = cls
            seq.dynamic_img_pad = False
            seq.backend = dispatch.check_backend(backend)
        return why

    def _parsed(self) -> tuple[SequentialPlan | None, str | None]:
        """(plan, why not fusable), bound to the current children."""
        children = tuple(self._modules.values())
        return bound(self, "_zeta_plan", children, lambda: parse_patch_sequential(self))

    def _plan(self) -> SequentialPlan | None:
        return self._parsed()[0]

    @property
    def why_not_fused(self) -> str | None:
        """Why the current children cannot be fused (None: they can, unless a call's context
        says otherwise: hooks, the backend, a PyTorch feature the op does not take part in)."""
        plan, why = self._parsed()
        return why if plan is None else norms_problem(plan)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_zeta_plan", None)  # bound to objects of this process: bound again on use
        return state

    def forward(self, x: Tensor) -> Tensor:
        y = self.try_fused(x)
        if y is not None:
            return y
        plan = self._plan()
        if plan is not None and self.dynamic_img_pad:  # the plain layers see the padded input
            x = pad_to_patch(x, plan.pattern.patch)
        return super().forward(x)

    def try_fused(self, x: Tensor, stem: Stem = NO_STEM) -> Tensor | None:
        """The fused output, or None when the plain Sequential must run. ``stem``: the rest of
        a whole stem (:class:`ViTStem`): output (B, P + N, D), images in vit-pytorch's layout
        only. Traced by torch.fx, the plain Sequential runs (docs/design.md, "torch.fx")."""
        if dispatch.symbolic_tracing():
            return None
        plan = self._plan()
        if plan is None or (stem is not NO_STEM and not plan.pattern.flat):
            return None
        patch = plan.pattern.patch
        check_input(x, plan.dim_in, patch, self.dynamic_img_pad)
        if self.dynamic_img_pad:
            x = pad_to_patch(x, patch)
        norm1, proj, norm2 = plan.norm1, plan.proj, plan.norm2
        if (
            norms_problem(plan) is not None
            or any(plan.hooks)
            or not dispatch.use_fused(self.backend, x)
        ):
            check_params(x, raw_params(norm1, proj, norm2))
            return None
        weight, bias = param(proj, "weight"), param(proj, "bias")
        pre, post = plan_norms(plan, x.dtype)
        shape = (proj.out_features, plan.patch_dim)
        pattern = plan.pattern
        if pattern.flat:  # vit-pytorch's images: the op's tokens as they are
            return fused_call(x, patch, weight, shape, bias, pre, post, stem)
        x_ordered, op_patch = _patch_order_view(x, pattern)
        y = fused_call(x_ordered, op_patch, weight, shape, bias, pre, post)
        return None if y is None else _tokens_as(y, x, pattern)


class PatchEmbeddings(nn.Module):
    """Image (B, C, H, W) -> patches -> norm -> Linear -> norm -> tokens (B, N, D).

    Args:
        dim_in: image channels C.
        dim_out: token width D.
        seq_len: pixels per patch (zeta's meaning): the projection's input width is
            ``seq_len * dim_in``; without ``patch_size`` the patch is square with side
            ``isqrt(seq_len)``.
        patch_size: int or (ph, pw), instead of or consistent with ``seq_len``.
        pre_norm / post_norm: a norm over the flattened patch / over the output.
        bias: projection bias.
        eps: the norms' epsilon.
        norm_layer: the norms' class, called as ``norm_layer(size, eps=eps, device=...,
            dtype=...)``: ``nn.LayerNorm`` (zeta's) or ``nn.RMSNorm``.
        dynamic_img_pad: zero-pad bottom/right to a multiple of the patch (as timm).
        backend: "auto" | "triton" | "eager"; ``ZETA_FUSED_BACKEND`` overrides "auto".

    The parameters live in ``self.embedding`` (Rearrange, norm or Identity, Linear, norm or
    Identity), so state-dict keys match zeta's ``PatchEmbeddings`` and a vit-pytorch
    ``to_patch_embedding`` state dict loads with an ``embedding.`` prefix.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        seq_len: int | None = None,
        *,
        patch_size: PatchSize | None = None,
        pre_norm: bool = True,
        post_norm: bool = True,
        bias: bool = True,
        eps: float = 1e-5,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        dynamic_img_pad: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        ph, pw = resolve_patch_size(seq_len, patch_size)
        dim_in, dim_out = as_int(dim_in, "dim_in"), as_int(dim_out, "dim_out")
        patch_dim = dim_in * ph * pw
        factory = {"device": device, "dtype": dtype}
        self.embedding = FusedPatchSequential(
            Rearrange(PATCHIFY, p1=ph, p2=pw),
            norm_layer(patch_dim, eps=eps, **factory) if pre_norm else nn.Identity(),
            nn.Linear(patch_dim, dim_out, bias=bias, **factory),
            norm_layer(dim_out, eps=eps, **factory) if post_norm else nn.Identity(),
            dynamic_img_pad=dynamic_img_pad,
            backend=backend,
        )
        self.dim_in, self.dim_out = dim_in, dim_out
        self.patch_size = (ph, pw)
        self.eps = eps

    # The settings live on the fused Sequential, which reads them per call.
    backend = forwarded("embedding", "backend", dispatch.check_backend)
    dynamic_img_pad = forwarded("embedding", "dynamic_img_pad")

    def forward(self, x: Tensor) -> Tensor:
        # From _modules, not through nn.Module.__getattr__ (per-call host path).
        embedding = self._modules.get("embedding")
        return (self.embedding if embedding is None else embedding)(x)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, backend={self.backend!r}"
