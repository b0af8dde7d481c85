"""``PatchEmbeddings``: zeta's documented module, fused on CUDA, eager everywhere else.

Its ``embedding`` is a :class:`FusedPatchSequential`: vit-pytorch's ``to_patch_embedding``
Sequential (Rearrange, LayerNorm?, Linear, LayerNorm?) whose forward runs the fused op when the
backend allows and is literally the Sequential otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from .. import dispatch
from ..checks import (
    NO_PARAMS,
    PatchSize,
    as_int,
    check_input,
    check_params,
    check_stem,
    checked_params,
    pad_to_patch,
    resolve_patch_size,
    wrapped_operand,
)
from ..functional import fused_patch_embed, op_inputs
from ..op.layout import PatchPattern, parse_patchify
from ..op.reference import NO_STEM, PATCHIFY, Norm, Stem


def _param(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` without ``nn.Module.__getattr__`` (the per-call host path reads six);
    anything not registered as a parameter (a parametrization's property) still goes through
    ``getattr``. Each parameter is read once per call, as the eager modules read it."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def plain(module: nn.Module, cls: type) -> bool:
    """``module`` computes what ``cls`` does: an instance whose class keeps ``cls.forward``
    (a LoRA-style subclass that overrides it does not)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def raw_params(*modules: nn.Module | None) -> list[Tensor]:
    """The registered parameters of ``modules``, read without running any parametrization."""
    return [p for m in modules if m is not None for p in m._parameters.values() if p is not None]


class SequentialPlan(NamedTuple):
    """What a fusable patch-embedding Sequential computes, bound to its children."""

    ln1: nn.LayerNorm | None
    proj: nn.Linear
    ln2: nn.LayerNorm | None
    pattern: PatchPattern  # its Rearrange, read
    dim_in: int
    patch_dim: int  # K
    hooks: tuple[dict, ...]  # dispatch.hook_dicts of every child


def _class_name(m: nn.Module) -> str:
    """A layer's class, by its full name outside torch.nn: a quantized "Linear" is not one."""
    cls = type(m)
    if cls.__module__.startswith("torch.nn."):
        return cls.__name__
    return f"{cls.__module__}.{cls.__name__}"


def parse_patch_sequential(layers: nn.Sequential) -> tuple[SequentialPlan | None, str | None]:
    """Read a vit-pytorch patch-embedding Sequential of any spatial rank (a patchifying
    Rearrange, then LayerNorm?, Linear, LayerNorm?, nn.Identity in a norm's place); returns
    (plan, None), or (None, why it cannot be fused)."""
    mods = list(layers._modules.values())
    first = mods[0] if mods else None
    if not isinstance(first, Rearrange):
        return None, "first layer is not a Rearrange"
    pattern = parse_patchify(" ".join(first.pattern.split()), tuple(first.axes_lengths.items()))
    if isinstance(pattern, str):
        return None, f"Rearrange {first.pattern!r}: {pattern}"
    rest = [m for m in mods[1:] if not plain(m, nn.Identity)]  # Identity: no norm
    # Any other class is "other", whatever its name (quantize_dynamic's Linear is "Linear" too).
    kinds = tuple("LayerNorm" if plain(m, nn.LayerNorm) else "Linear" if plain(m, nn.Linear)
                  else "other" for m in rest)  # fmt: skip
    layouts = {
        ("Linear",): (None, 0, None),
        ("LayerNorm", "Linear"): (0, 1, None),
        ("Linear", "LayerNorm"): (None, 0, 1),
        ("LayerNorm", "Linear", "LayerNorm"): (0, 1, 2),
    }
    if kinds not in layouts:
        names = [_class_name(m) for m in mods[1:]]
        return None, f"layers after Rearrange are {names}, not LayerNorm?, Linear, LayerNorm?"
    ln1, proj, ln2 = (None if i is None else rest[i] for i in layouts[kinds])
    pixels = math.prod(pattern.patch)
    if proj.in_features % pixels:
        return None, f"Linear in_features {proj.in_features} is not a multiple of {pixels}"
    plan = SequentialPlan(ln1, proj, ln2, pattern, proj.in_features // pixels, proj.in_features,
                          dispatch.hook_dicts(*mods))  # fmt: skip
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


def norm_params(ln: nn.LayerNorm | None) -> Norm:
    """A LayerNorm's (weight, bias) for the op, or None for no norm."""
    return None if ln is None else (_param(ln, "weight"), _param(ln, "bias"))


def over(ln: nn.LayerNorm | None, size: int) -> bool:
    """No norm, or a LayerNorm over ``size`` values (read before any parameter is)."""
    return ln is None or ln.normalized_shape == (size,)


def norms_problem(plan: SequentialPlan) -> str | None:
    """Why the plan's LayerNorms are not what one fused call computes (checked per call: a
    norm's eps or size may change in place), or None."""
    ln1, ln2 = plan.ln1, plan.ln2
    if ln1 is not None and ln2 is not None and ln1.eps != ln2.eps:
        return f"its LayerNorms' eps differ ({ln1.eps} and {ln2.eps}): the op takes one"
    if not (over(ln1, plan.patch_dim) and over(ln2, plan.proj.out_features)):
        return "a LayerNorm over another size than the patch or the embedding"
    return None


def plan_eps(plan: SequentialPlan) -> float:
    """The one epsilon of the plan's LayerNorms (norms_problem: they agree)."""
    ln = plan.ln1 if plan.ln1 is not None else plan.ln2
    return 1e-5 if ln is None else ln.eps


_NO_CHECKED = (object(),) * 6


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

    def _plan(self) -> SequentialPlan | None:
        children = tuple(self._modules.values())
        bound = self.__dict__.get("_zeta_bound")
        if bound is None or bound[0] != children:
            bound = (children, *parse_patch_sequential(self))
            self.__dict__["_zeta_bound"] = bound
        return bound[1]

    @property
    def why_not_fused(self) -> str | None:
        self._plan()
        return self._zeta_bound[2]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_zeta_bound", None)  # bound to objects of this process: bound again on use
        state.pop("_zeta_checked", None)
        return state

    def forward(self, x: Tensor) -> Tensor:
        y = self.zeta_call(x)
        if y is not None:
            return y
        plan = self._plan()
        if plan is not None and self.dynamic_img_pad:  # the plain layers see the padded input
            x = pad_to_patch(x, plan.pattern.patch)
        return super().forward(x)

    def zeta_call(self, x: Tensor, stem: Stem = NO_STEM) -> Tensor | None:
        """The fused output, or None when the plain Sequential must run. ``stem``: the rest of
        a whole stem (:class:`ViTStem`): output (B, P + N, D), images in vit-pytorch's layout
        only."""
        plan = self._plan()
        if plan is None or (stem is not NO_STEM and not plan.pattern.flat):
            return None
        patch = plan.pattern.patch
        check_input(x, plan.dim_in, patch, self.dynamic_img_pad)
        if self.dynamic_img_pad:
            x = pad_to_patch(x, patch)
        ln1, proj, ln2 = plan.ln1, plan.proj, plan.ln2
        eps = plan_eps(plan)
        if (
            norms_problem(plan) is not None
            or any(plan.hooks)
            or not dispatch.use_fused(self.backend, x)
        ):
            check_params(x, raw_params(ln1, proj, ln2))
            return None
        weight, bias = _param(proj, "weight"), _param(proj, "bias")
        pre, post = norm_params(ln1), norm_params(ln2)
        # The shapes of parameters seen before are not checked again (their devices and dtypes
        # are): a parameter replaced by another is; one resized in place through .data is not.
        g1, b1 = pre or NO_PARAMS
        g2, b2 = post or NO_PARAMS
        seen = self.__dict__.get("_zeta_checked", _NO_CHECKED)
        known = (
            seen[0] is weight and seen[1] is bias and seen[2] is g1 and seen[3] is b1
            and seen[4] is g2 and seen[5] is b2
        )  # fmt: skip
        if not known:  # (the instance dict: nn.Module.__setattr__ is slow)
            self.__dict__["_zeta_checked"] = (weight, bias, g1, b1, g2, b2)
        shape = (proj.out_features, plan.patch_dim)
        bias, pre, post = checked_params(x, weight, shape, bias, pre, post, known)
        pattern = plan.pattern
        if pattern.flat:  # vit-pytorch's images: the op's tokens as they are
            if stem is not NO_STEM:
                stem = check_stem(x, patch, proj.out_features, *stem)
            args = op_inputs(x, patch, weight, bias, pre, post, eps, stem)
            return None if wrapped_operand(args) else fused_patch_embed(args)
        x_ordered, op_patch = _patch_order_view(x, pattern)
        args = op_inputs(x_ordered, op_patch, weight, bias, pre, post, eps)
        return None if wrapped_operand(args) else _tokens_as(fused_patch_embed(args), x, pattern)


class PatchEmbeddings(nn.Module):
    """Image (B, C, H, W) -> patches -> LayerNorm -> Linear -> LayerNorm -> tokens (B, N, D).

    Args:
        dim_in: image channels C.
        dim_out: token width D.
        seq_len: pixels per patch (zeta's meaning): the projection's input width is
            ``seq_len * dim_in``; without ``patch_size`` the patch is square with side
            ``isqrt(seq_len)``.
        patch_size: int or (ph, pw), instead of or consistent with ``seq_len``.
        pre_norm / post_norm: LayerNorm over the flattened patch / over the output.
        bias: projection bias.
        eps: LayerNorm epsilon.
        dynamic_img_pad: zero-pad bottom/right to a multiple of the patch (as timm).
        backend: "auto" | "triton" | "eager"; ``ZETA_FUSED_BACKEND`` overrides "auto".

    The parameters live in ``self.embedding`` (Rearrange, LayerNorm or Identity, Linear,
    LayerNorm or Identity), so state-dict keys match zeta's ``PatchEmbeddings`` and a vit-pytorch
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
            nn.LayerNorm(patch_dim, eps=eps, **factory) if pre_norm else nn.Identity(),
            nn.Linear(patch_dim, dim_out, bias=bias, **factory),
            nn.LayerNorm(dim_out, eps=eps, **factory) if post_norm else nn.Identity(),
            dynamic_img_pad=dynamic_img_pad,
            backend=backend,
        )
        self.dim_in, self.dim_out = dim_in, dim_out
        self.patch_size = (ph, pw)
        self.eps = eps

    @property
    def backend(self) -> str:
        return self.embedding.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.embedding.backend = dispatch.check_backend(value)

    @property
    def dynamic_img_pad(self) -> bool:
        return self.embedding.dynamic_img_pad

    @dynamic_img_pad.setter
    def dynamic_img_pad(self, value: bool) -> None:
        self.embedding.dynamic_img_pad = value

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(x)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, backend={self.backend!r}"
