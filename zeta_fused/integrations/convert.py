"""One-call conversion of existing models' patch embeddings to the fused op.

``fuse_patch_embeddings(model)`` converts, in place:

- vit-pytorch ``to_patch_embedding`` Sequentials (Rearrange, LayerNorm, Linear, LayerNorm, or
  a subset) -> :class:`~zeta_fused.module.FusedPatchSequential`;
- timm ``PatchEmbed`` (Conv2d with kernel = stride = patch, optional LayerNorm, any output
  format) -> a subclass of its own class with a fused forward;
- transformers and diffusers patch convolutions (a Conv1d/2d/3d with kernel = stride kept as
  ``projection``, ``patch_embedding`` or ``proj``: ViT, DeiT, DINOv2, CLIP, SigLIP, VideoMAE,
  ViViT, V-JEPA 2, Qwen2/2.5/3-VL, Wan, HunyuanVideo, DiT, ...) -> the fused conv of the same
  rank (:mod:`zeta_fused.peers`), so the model's own forward, signature and errors stay.

Conversion only changes the modules' classes: the same module objects, the same Parameters
(no new Parameter is ever created: optimizers and tied weights keep working) and the same
state-dict keys, so checkpoints saved before conversion load after it and vice versa. Whatever
cannot be fused exactly is left untouched and reported with the reason, and so is any other
patch convolution (kernel = stride) or ``to_patch_embedding`` the walk meets. Converting again
reports the fused modules as such and sets their backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from einops.layers.torch import Rearrange
from torch import nn

from .. import dispatch
from ..nn.patch_embed import FusedPatchSequential
from .convs import (
    CONVS,
    FusedPatchConv1d,
    FusedPatchConv2d,
    FusedPatchConv3d,
    fuse_conv,
    fused_timm_class,
    is_fused,
    patch_conv_problem,
    timm_problem,
)


@dataclass
class FuseSummary:
    """What :func:`fuse_patch_embeddings` did, by module name: converted now, fused already
    (their backend set again), and left alone with the reason."""

    converted: list[tuple[str, str]] = field(default_factory=list)  # (name, kind)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    already_fused: list[tuple[str, str]] = field(default_factory=list)  # (name, kind)

    def __str__(self) -> str:
        lines = [
            f"converted {len(self.converted)}, skipped {len(self.skipped)}"
            + (f", already fused {len(self.already_fused)}" if self.already_fused else "")
        ]
        lines += [f"  converted {name or '<root>'}: {kind}" for name, kind in self.converted]
        lines += [
            f"  already fused {name or '<root>'}: {kind}" for name, kind in self.already_fused
        ]
        lines += [f"  skipped {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _is_timm_patch_embed(m: nn.Module) -> bool:
    try:
        from timm.layers import PatchEmbed
    except ImportError:
        return False
    return isinstance(m, PatchEmbed)


# The libraries whose modules keep their patch projection conv under one of these names: it
# is converted wherever it is a patch conv (kernel = stride), the module's forward unchanged.
CONV_LIBRARIES = ("transformers.", "diffusers.")
PATCH_CONV_NAMES = ("projection", "patch_embedding", "proj")


def _library_patch_conv(m: nn.Module) -> str | None:
    """The attribute holding a transformers or diffusers module's projection conv, or None: a
    patch conv (kernel = stride), or any conv of an embedding class (``*Embed*``), whose
    overlap or padding the summary then reports."""
    if not type(m).__module__.startswith(CONV_LIBRARIES):
        return None
    for attr in PATCH_CONV_NAMES:
        conv = m._modules.get(attr)
        if isinstance(conv, CONVS) and (
            conv.kernel_size == conv.stride or "Embed" in type(m).__name__
        ):
            return attr
    return None


def _is_vit_pytorch_stem(m: nn.Module) -> bool:
    """A plain Sequential starting with a Rearrange that cuts patches (it names their sizes)."""
    if type(m) is not nn.Sequential or len(m) == 0:
        return False
    first = next(iter(m.children()))
    return isinstance(first, Rearrange) and bool(first.axes_lengths)


def fuse_patch_embeddings(model: nn.Module, *, backend: str = "auto") -> FuseSummary:
    """Convert the patch embeddings of a vit-pytorch, timm or transformers model in place.

    Args:
        model: any ``nn.Module``; it is walked recursively (the root itself included).
        backend: "auto" | "triton" | "eager" for the converted modules (see the README); set
            on modules that were fused already too.

    Returns:
        A :class:`FuseSummary` naming every converted module, every one fused already, and
        every candidate left alone with the reason (a padded or overlapping conv, another norm,
        another layout, a patch convolution inside a stem the converter does not know, ...).
    """
    dispatch.check_backend(backend)
    summary = FuseSummary()
    handled: set[int] = set()  # modules converted or reported, with their patch convs
    for name, m in list(model.named_modules()):
        if id(m) in handled:
            continue
        if isinstance(m, FusedPatchSequential) or is_fused(m):
            _already_fused(summary, name, m, backend)
            handled.update(id(c) for c in m.modules())
        elif _is_vit_pytorch_stem(m):
            why = FusedPatchSequential.fuse_in_place(m, backend)
            _record(summary, name, "vit-pytorch to_patch_embedding", why)
            handled.update(id(c) for c in m.modules())
        elif _is_timm_patch_embed(m):
            kind, why = f"timm {type(m).__name__}", timm_problem(m, type(m))
            if why is None:
                m.__class__ = fused_timm_class(type(m))
                m.zeta_backend = backend
            _record(summary, name, kind, why)
            handled.update(id(c) for c in m.modules())
        elif (attr := _library_patch_conv(m)) is not None:
            conv, conv_name = getattr(m, attr), f"{name}.{attr}" if name else attr
            handled.add(id(conv))
            if is_fused(conv):
                _already_fused(summary, conv_name, conv, backend)
                continue
            why = patch_conv_problem(conv)
            if why is None:
                fuse_conv(conv, backend)
            library = type(m).__module__.split(".")[0]
            _record(summary, conv_name, f"{library} {type(m).__name__}", why)
    _report_unknown_stems(model, handled, summary)
    return summary


def _already_fused(summary: FuseSummary, name: str, m: nn.Module, backend: str) -> None:
    """A module converted before: its backend is set to this call's."""
    if isinstance(m, FusedPatchSequential):
        m.backend = backend
    else:
        m.zeta_backend = backend
    summary.already_fused.append((name, f"{type(m).__name__}, backend {backend!r}"))


def _report_unknown_stems(model: nn.Module, handled: set[int], summary: FuseSummary) -> None:
    """Patch convolutions (kernel = stride > 1) and ``to_patch_embedding`` modules outside the
    stems above: listed as skipped, so that a summary never hides a patch embedding."""
    parents = {id(c): m for m in model.modules() for c in m.children()}
    for name, m in model.named_modules():
        if id(m) in handled:
            continue
        parent = type(parents[id(m)]).__name__ if id(m) in parents else "the model"
        if isinstance(m, CONVS) and m.kernel_size == m.stride and max(m.kernel_size) > 1:
            why = "not a patch embedding this converter knows (its forward is left as is)"
            summary.skipped.append((name, f"patch convolution inside {parent}: {why}"))
        elif name.rsplit(".", 1)[-1] == "to_patch_embedding":
            first = next(iter(m.children()), None)
            why = (
                f"a {type(m).__name__} this converter does not know"
                if isinstance(first, Rearrange)
                else "no Rearrange first: it takes patches already cut (as NaViT does), and "
                "rows input is not fused yet"
            )
            summary.skipped.append((name, f"to_patch_embedding inside {parent}: {why}"))


def _record(summary: FuseSummary, name: str, kind: str, why: str | None) -> None:
    if why is None:
        summary.converted.append((name, kind))
    else:
        summary.skipped.append((name, f"{kind}: {why}"))


__all__ = [
    "FuseSummary",
    "FusedPatchConv1d",
    "FusedPatchConv2d",
    "FusedPatchConv3d",
    "fuse_patch_embeddings",
]
