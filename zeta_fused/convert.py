"""One-call conversion of existing models' patch embeddings to the fused op.

``fuse_patch_embeddings(model)`` converts, in place:

- vit-pytorch ``to_patch_embedding`` Sequentials (Rearrange, LayerNorm, Linear, LayerNorm, or
  a subset) -> :class:`~zeta_fused.module.FusedPatchSequential`;
- timm ``PatchEmbed`` (Conv2d with kernel = stride = patch, optional LayerNorm, any output
  format) -> a subclass of its own class with a fused forward;
- transformers ``*PatchEmbeddings`` (ViT, DeiT, DINOv2, ViT-MAE, ...): their ``projection``
  Conv2d -> :class:`FusedPatchConv2d`, so the model's own forward, signature and errors stay.

Conversion only changes the modules' classes: the same module objects, the same Parameters
(no new Parameter is ever created: optimizers and tied weights keep working) and the same
state-dict keys, so checkpoints saved before conversion load after it and vice versa. Whatever
cannot be fused exactly is left untouched and reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from einops.layers.torch import Rearrange
from torch import Tensor, nn

from . import dispatch
from .functional import check_input, check_params, fused_patch_embed, op_inputs, pad_to_patch
from .module import FusedPatchSequential


@dataclass
class FuseSummary:
    """What :func:`fuse_patch_embeddings` did: converted and skipped modules by name."""

    converted: list[tuple[str, str]] = field(default_factory=list)  # (name, kind)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}, skipped {len(self.skipped)}"]
        lines += [f"  converted {name or '<root>'}: {kind}" for name, kind in self.converted]
        lines += [f"  skipped {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _patch_conv_problem(conv: nn.Module) -> str | None:
    """Why a conv is not a non-overlapping patch projection we compute exactly, or None."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"projection is {type(conv).__name__}, not a plain Conv2d"
    if conv.kernel_size != conv.stride:
        return f"overlapping conv: kernel {conv.kernel_size} != stride {conv.stride}"
    padded = conv.padding != "valid" if isinstance(conv.padding, str) else any(conv.padding)
    if padded:
        return f"padded conv (padding={conv.padding})"
    if conv.dilation != (1, 1) or conv.groups != 1:
        return f"dilated or grouped conv (dilation={conv.dilation}, groups={conv.groups})"
    return None


def _conv_semantics(x: Tensor, patch: tuple[int, int]) -> bool:
    """Inputs the original module must handle itself: unbatched (C, H, W) images, and images
    smaller than one patch (the conv raises its own error for those)."""
    return x.ndim != 4 or x.shape[-2] < patch[0] or x.shape[-1] < patch[1]


def _crop_to_grid(x: Tensor, patch: tuple[int, int]) -> Tensor:
    """What a stride-patch conv sees: the bottom/right remainder is dropped (a view)."""
    ph, pw = patch
    return x[..., : x.shape[-2] // ph * ph, : x.shape[-1] // pw * pw]


class FusedPatchConv2d(nn.Conv2d):
    """A Conv2d with kernel = stride = patch computed by the fused op. Returns the conv's values
    as a channels-last (B, D, h, w) tensor, so ``.flatten(2).transpose(1, 2)`` is free."""

    zeta_backend: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        if _conv_semantics(x, self.kernel_size) or not dispatch.use_fused(self.zeta_backend, x):
            return super().forward(x)
        x = _crop_to_grid(x, self.kernel_size)
        check_input(x, self.in_channels, self.kernel_size, False)
        check_params(x, [self.weight, self.bias])
        args = op_inputs(x, self.kernel_size, self.weight, self.bias, None, None, 1e-5)
        y = fused_patch_embed(args)
        return _to_format(y, x, self.kernel_size, "NCHW")


def _to_format(y: Tensor, x: Tensor, patch: tuple[int, int], fmt: str) -> Tensor:
    """(B, N, D) tokens as timm's output formats (views, no copies)."""
    if fmt == "NLC":
        return y
    if fmt == "NCL":
        return y.transpose(1, 2)
    grid = y.view(y.shape[0], x.shape[-2] // patch[0], x.shape[-1] // patch[1], y.shape[-1])
    return grid if fmt == "NHWC" else grid.permute(0, 3, 1, 2)


class _FusedTimmPatchEmbed:
    """Mixed in front of a timm ``PatchEmbed`` class: the same checks, padding and output
    format, with projection and LayerNorm fused."""

    zeta_backend: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        if _conv_semantics(x, self.patch_size) or not dispatch.use_fused(self.zeta_backend, x):
            return super().forward(x)
        height, width = x.shape[-2:]
        ph, pw = self.patch_size
        if self.img_size is not None:
            if self.strict_img_size and (height, width) != tuple(self.img_size):
                raise AssertionError(
                    f"input size {height}x{width} does not match the model's {self.img_size}"
                )
            ragged = height % ph or width % pw
            if not self.strict_img_size and not self.dynamic_img_pad and ragged:
                raise AssertionError(
                    f"input size {height}x{width} is not a multiple of the patch {ph}x{pw}"
                )
        if self.dynamic_img_pad:
            x = pad_to_patch(x, (ph, pw))
        x = _crop_to_grid(x, (ph, pw))
        proj = self.proj
        check_input(x, proj.in_channels, (ph, pw), False)
        check_params(x, [proj.weight, proj.bias])
        norm = self.norm if isinstance(self.norm, nn.LayerNorm) else None
        post = None if norm is None else (norm.weight, norm.bias)
        eps = 1e-5 if norm is None else norm.eps
        y = fused_patch_embed(op_inputs(x, (ph, pw), proj.weight, proj.bias, None, post, eps))
        return _to_format(y, x, (ph, pw), _timm_format(self))


def _timm_format(m: nn.Module) -> str:
    return "NLC" if m.flatten else m.output_fmt.value


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (_FusedTimmPatchEmbed, cls), {})
    return _FUSED_CLASSES[cls]


def _timm_problem(m: nn.Module) -> str | None:
    from timm.layers import PatchEmbed

    if type(m).forward is not PatchEmbed.forward:
        return f"{type(m).__name__} overrides PatchEmbed.forward"
    why = _patch_conv_problem(m.proj)
    if why:
        return why
    if tuple(m.proj.kernel_size) != tuple(m.patch_size):
        return f"conv kernel {m.proj.kernel_size} != patch_size {m.patch_size}"
    if isinstance(m.norm, nn.Identity):
        return None
    if not isinstance(m.norm, nn.LayerNorm):
        return f"norm is {type(m.norm).__name__}, not LayerNorm"
    if tuple(m.norm.normalized_shape) != (m.proj.out_channels,):
        return f"LayerNorm over {tuple(m.norm.normalized_shape)}, not the embedding dim"
    if _timm_format(m) not in ("NLC", "NHWC"):
        return f"LayerNorm after output format {_timm_format(m)} (not over the embedding dim)"
    return None


def _is_timm_patch_embed(m: nn.Module) -> bool:
    try:
        from timm.layers import PatchEmbed
    except ImportError:
        return False
    return isinstance(m, PatchEmbed)


def _is_hf_patch_embeddings(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("PatchEmbeddings")


def _is_vit_pytorch_stem(m: nn.Module) -> bool:
    return (
        type(m) is nn.Sequential and len(m) > 0 and isinstance(next(iter(m.children())), Rearrange)
    )


def fuse_patch_embeddings(model: nn.Module, *, backend: str = "auto") -> FuseSummary:
    """Convert the patch embeddings of a vit-pytorch, timm or transformers model in place.

    Args:
        model: any ``nn.Module``; it is walked recursively (the root itself included).
        backend: "auto" | "triton" | "eager" for the converted modules (see the README).

    Returns:
        A :class:`FuseSummary` naming every converted module and every candidate left alone
        with the reason (a padded or overlapping conv, another norm, another layout, ...).
    """
    dispatch.check_backend(backend)
    summary = FuseSummary()
    for name, m in list(model.named_modules()):
        if isinstance(m, (FusedPatchSequential, FusedPatchConv2d, _FusedTimmPatchEmbed)):
            continue
        if _is_vit_pytorch_stem(m):
            if "p1" not in next(iter(m.children())).pattern:
                continue  # a Rearrange that does not patchify: not a candidate
            why = FusedPatchSequential.fuse_in_place(m, backend)
            _record(summary, name, "vit-pytorch to_patch_embedding", why)
        elif _is_timm_patch_embed(m):
            kind, why = f"timm {type(m).__name__}", _timm_problem(m)
            if why is None:
                m.__class__ = _fused_class(type(m))
                m.zeta_backend = backend
            _record(summary, name, kind, why)
        elif _is_hf_patch_embeddings(m):
            conv = getattr(m, "projection", None)
            why = _patch_conv_problem(conv)
            if why is None:
                conv.__class__ = FusedPatchConv2d
                conv.zeta_backend = backend
            _record(summary, f"{name}.projection", f"transformers {type(m).__name__}", why)
    return summary


def _record(summary: FuseSummary, name: str, kind: str, why: str | None) -> None:
    if why is None:
        summary.converted.append((name, kind))
    else:
        summary.skipped.append((name, f"{kind}: {why}"))


__all__ = ["FuseSummary", "FusedPatchConv2d", "fuse_patch_embeddings"]
