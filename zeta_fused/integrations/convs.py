"""Fused versions of other libraries' patch embeddings, which ``fuse_patch_embeddings`` swaps in
by changing a module's class (the same object, Parameters and state-dict keys):

- :class:`FusedPatchConv1d` / ``2d`` / ``3d``: a ConvNd with kernel = stride = patch
  (transformers' ViT, DeiT, DINOv2, CLIP, SigLIP, VideoMAE, ViViT, V-JEPA 2, Qwen-VL
  projections, diffusers' Wan and HunyuanVideo ones), whose callers stay as they are;
- a subclass of a timm ``PatchEmbed`` class (:func:`fused_timm_class`) with the same checks,
  padding and output formats, projection and LayerNorm fused.

Each call runs the original forward where the fused op would not give the same thing
(docs/design.md, "Drop-in rule"): hooks on a child, a child replaced by one that cannot be
fused, or a PyTorch feature the op does not take part in.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .. import dispatch
from ..checks import check_input, check_stem, checked_params, pad_to_patch
from ..functional import fused_patch_embed, op_inputs
from ..nn.patch_embed import _param, norm_params, over, plain
from ..op.reference import NO_STEM, Stem

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def patch_conv_problem(conv: nn.Module) -> str | None:
    """Why a module is not a non-overlapping patch projection computed exactly (a plain
    Conv1d/2d/3d, or one converted already, with kernel = stride, no padding, dilation or
    groups), or None."""
    cls = next((c for c in (*FUSED_CONVS, *CONVS) if isinstance(conv, c)), None)
    if cls is None or not plain(conv, cls):
        return f"projection is {type(conv).__name__}, not a plain Conv1d/2d/3d"
    if conv.kernel_size != conv.stride:
        return f"overlapping conv: kernel {conv.kernel_size} != stride {conv.stride}"
    padded = conv.padding != "valid" if isinstance(conv.padding, str) else any(conv.padding)
    if padded:
        return f"padded conv (padding={conv.padding})"
    if any(d != 1 for d in conv.dilation) or conv.groups != 1:
        return f"dilated or grouped conv (dilation={conv.dilation}, groups={conv.groups})"
    return None


def _conv_semantics(x: Tensor, patch: tuple[int, ...]) -> bool:
    """Inputs the original module must handle itself: unbatched inputs, and inputs smaller
    than one patch (the conv raises its own error for those)."""
    return x.ndim != len(patch) + 2 or any(s < p for s, p in zip(x.shape[2:], patch, strict=True))


def _crop_to_grid(x: Tensor, patch: tuple[int, ...]) -> Tensor:
    """What a stride-patch conv sees: the remainder at the end of each dimension is dropped."""
    if not any(s % p for s, p in zip(x.shape[2:], patch, strict=True)):
        return x
    return x[(..., *(slice(0, s // p * p) for s, p in zip(x.shape[2:], patch, strict=True)))]


def _to_format(y: Tensor, x: Tensor, patch: tuple[int, ...], fmt: str) -> Tensor:
    """(B, N, D) tokens as timm's output formats or a conv's (B, D, *grid) (views, no copies)."""
    if fmt == "NLC":
        return y
    if fmt == "NCL":
        return y.transpose(1, 2)
    grid = [s // p for s, p in zip(x.shape[2:], patch, strict=True)]
    tokens = y.view(y.shape[0], *grid, y.shape[-1])
    return tokens if fmt == "NHWC" else tokens.movedim(-1, 1)


class _FusedPatchConv:
    """A ConvNd with kernel = stride = patch computed by the fused op. Returns the conv's values
    as a channels-last (B, D, *grid) tensor, so ``.flatten(2).transpose(1, 2)`` is free. Its own
    hooks run as for any module call."""

    zeta_backend: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        patch = self.kernel_size
        if (
            _conv_semantics(x, patch)
            or patch_conv_problem(self) is not None  # stride, padding... may change in place
            or not dispatch.use_fused(self.zeta_backend, x)
        ):
            return super().forward(x)
        x = _crop_to_grid(x, patch)
        check_input(x, self.in_channels, patch, False)
        weight, bias = _param(self, "weight"), _param(self, "bias")
        shape = (self.out_channels, self.in_channels, *patch)
        bias = checked_params(x, weight, shape, bias, None, None)[0]
        y = fused_patch_embed(op_inputs(x, patch, weight, bias, None, None, 1e-5))
        return _to_format(y, x, patch, "NCHW")


class FusedPatchConv1d(_FusedPatchConv, nn.Conv1d):
    """A Conv1d with kernel = stride = patch, fused (sequences)."""


class FusedPatchConv2d(_FusedPatchConv, nn.Conv2d):
    """A Conv2d with kernel = stride = patch, fused (images)."""


class FusedPatchConv3d(_FusedPatchConv, nn.Conv3d):
    """A Conv3d with kernel = stride = patch, fused (video tubelets, volumes, pre-cut rows)."""


FUSED_CONVS = (FusedPatchConv1d, FusedPatchConv2d, FusedPatchConv3d)


def fuse_conv(conv: nn.Module, backend: str) -> None:
    """Swap a plain patch ConvNd's class for its fused one (same object and Parameters)."""
    conv.__class__ = FUSED_CONVS[CONVS.index(type(conv))]
    conv.zeta_backend = backend


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
    if not plain(m.norm, nn.LayerNorm):
        return f"norm is {type(m.norm).__name__}, not LayerNorm"
    if tuple(m.norm.normalized_shape) != (m.proj.out_channels,):
        return f"LayerNorm over {tuple(m.norm.normalized_shape)}, not the embedding dim"
    if timm_format(m) not in ("NLC", "NHWC"):
        return f"LayerNorm after output format {timm_format(m)} (not over the embedding dim)"
    return None


class _FusedTimmPatchEmbed:
    """Mixed in front of a timm ``PatchEmbed`` class: the same checks, padding and output
    format, with projection and LayerNorm fused."""

    zeta_backend: str = "auto"
    _zeta_base: type  # the timm class converted from

    def _zeta_stem(self) -> tuple:
        """(why not fusable or None, hook tables), bound to the current proj and norm."""
        children = (self.proj, self.norm)
        bound = self.__dict__.get("_zeta_bound")
        if bound is None or bound[0] != children:
            why = timm_problem(self, self._zeta_base)
            bound = (children, why, dispatch.hook_dicts(*children))
            self.__dict__["_zeta_bound"] = bound
        return bound[1:]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_zeta_bound", None)  # bound to objects of this process: bound again on use
        return state

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickled as the timm class, converted again on load.
        return rebuild_fused, (self._zeta_base, self.__getstate__(), fused_timm_class)

    def forward(self, x: Tensor) -> Tensor:
        y = self.zeta_call(x)
        return super().forward(x) if y is None else y  # timm's own forward, its own errors

    def zeta_call(self, x: Tensor, stem: Callable[[tuple[int, ...]], Stem] | None = None):
        """The fused output in timm's output format, or None when timm's forward must run.
        ``stem(grid)``: the rest of a whole stem (zeta_fused.stems_timm), output (B, P + N, D);
        None from it: the stem cannot be fused for this input."""
        why, hooks = self._zeta_stem()
        proj, norm = self.proj, self.norm
        is_norm, fmt = not plain(norm, nn.Identity), timm_format(self)
        if (
            why is not None
            or any(hooks)
            or patch_conv_problem(proj) is not None  # its stride, padding... may change in place
            or (is_norm and fmt not in ("NLC", "NHWC"))  # a norm over another axis: eager
            or not over(norm if is_norm else None, proj.out_channels)
            or _conv_semantics(x, self.patch_size)
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
        if self.dynamic_img_pad:
            x = pad_to_patch(x, (ph, pw))
        x = _crop_to_grid(x, (ph, pw))
        check_input(x, proj.in_channels, (ph, pw), False)
        parts = NO_STEM
        if stem is not None:
            parts = stem((x.shape[-2] // ph, x.shape[-1] // pw))
            if parts is None:
                return None
            parts = check_stem(x, (ph, pw), proj.out_channels, *parts)
        weight, bias = _param(proj, "weight"), _param(proj, "bias")
        shape = (proj.out_channels, proj.in_channels, ph, pw)
        post = norm_params(norm if is_norm else None)
        bias, _, post = checked_params(x, weight, shape, bias, None, post)
        eps = norm.eps if is_norm else 1e-5
        y = fused_patch_embed(op_inputs(x, (ph, pw), weight, bias, None, post, eps, parts))
        return y if stem is not None else _to_format(y, x, (ph, pw), fmt)


_FUSED_CLASSES: dict[type, type] = {}


def fused_timm_class(cls: type) -> type:
    """The fused subclass of a timm ``PatchEmbed`` class (one per class)."""
    if cls not in _FUSED_CLASSES:
        attrs = {"_zeta_base": cls, "__module__": __name__}
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (_FusedTimmPatchEmbed, cls), attrs)
    return _FUSED_CLASSES[cls]


def rebuild_fused(cls: type, state: dict, make, *args) -> nn.Module:
    """Unpickle a module whose fused class was made at run time: an instance of the peer's
    ``cls`` with ``state``, its class then swapped to ``make(*args, cls)``."""
    module = cls.__new__(cls)
    module.__setstate__(state)
    module.__class__ = make(*args, cls)
    return module


def is_fused(m: nn.Module) -> bool:
    return isinstance(m, (_FusedPatchConv, _FusedTimmPatchEmbed))
