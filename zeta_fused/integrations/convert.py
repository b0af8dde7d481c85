"""One-call conversion of existing models: ``fuse_stems(model)`` fuses whole ViT stems (the kinds
each library module lists in ``STEM_KINDS``), then the other patch embeddings;
``fuse_patch_embeddings(model)`` converts, in place:

- vit-pytorch ``to_patch_embedding`` Sequentials (Rearrange, LayerNorm, Linear, LayerNorm, or
  a subset) -> :class:`~zeta_fused.FusedPatchSequential`;
- timm ``PatchEmbed`` (Conv2d with kernel = stride = patch, optional LayerNorm, any output
  format) -> a subclass of its own class with a fused forward;
- transformers and diffusers patch convolutions (a Conv1d/2d/3d with kernel = stride kept as
  ``projection``, ``patch_embedding`` or ``proj``: ViT, DeiT, DINOv2, CLIP, SigLIP, VideoMAE,
  ViViT, V-JEPA 2, Qwen2/2.5/3-VL, Wan, HunyuanVideo, DiT, ...) -> the fused conv of the same
  rank (``convs``), so the model's own forward, signature and errors stay.

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
from . import (
    diffusers,
    open_clip,
    segment_anything,
    timm,
    transformers,
    transformers_clip,
    transformers_masked,
    vit_pytorch,
)
from ._base import FusedStem, HandoffModule, StemKind
from .convs import (
    CONVS,
    FusedPatchConv,
    FusedPatchConv1d,
    FusedPatchConv2d,
    FusedPatchConv3d,
    fuse_conv,
    library_patch_conv,
    patch_conv_problem,
)

# Every whole stem the converter knows, by library.
STEM_KINDS: tuple[StemKind, ...] = (
    *timm.STEM_KINDS,
    *transformers.STEM_KINDS,
    *transformers_clip.STEM_KINDS,
    *transformers_masked.STEM_KINDS,
    *vit_pytorch.STEM_KINDS,
    *open_clip.STEM_KINDS,
    *segment_anything.STEM_KINDS,
    *diffusers.STEM_KINDS,
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


def fuse_patch_embeddings(model: nn.Module, *, backend: str = "auto") -> FuseSummary:
    """Convert the patch embeddings of a vit-pytorch, timm or transformers model in place.

    Args:
        model: any ``nn.Module``; it is walked recursively (the root itself included).
        backend: "auto" | "triton" | "eager" for the converted modules (docs/guarantees.md,
            "Backend selection"); set on modules that were fused already too.

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
        if isinstance(m, FusedPatchSequential) or _is_fused(m):
            _already_fused(summary, name, m, backend)
            handled.update(id(c) for c in m.modules())
        elif vit_pytorch.is_patch_sequential(m):
            why = FusedPatchSequential.fuse_in_place(m, backend)
            _record(summary, name, "vit-pytorch to_patch_embedding", why)
            handled.update(id(c) for c in m.modules())
        elif timm.is_patch_embed(m):
            kind, why = f"timm {type(m).__name__}", timm.timm_problem(m, type(m))
            if why is None:
                m.__class__ = timm.fused_timm_class(type(m))
                m.zeta_backend = backend
            _record(summary, name, kind, why)
            handled.update(id(c) for c in m.modules())
        elif (attr := library_patch_conv(m)) is not None:
            conv, conv_name = getattr(m, attr), f"{name}.{attr}" if name else attr
            handled.add(id(conv))
            if _is_fused(conv):
                _already_fused(summary, conv_name, conv, backend)
                continue
            why = patch_conv_problem(conv)
            if why is None:
                fuse_conv(conv, backend)
            library = type(m).__module__.split(".")[0]
            _record(summary, conv_name, f"{library} {type(m).__name__}", why)
    _report_unknown_stems(model, handled, summary)
    return summary


def fuse_stems(model: nn.Module, *, backend: str = "auto") -> FuseSummary:
    """Fuse the whole ViT stems of a model in place, then its other patch embeddings.

    Args:
        model: any ``nn.Module``, walked recursively (the root included).
        backend: "auto" | "triton" | "eager" for the converted modules (docs/guarantees.md,
            "Backend selection").

    Returns:
        A :class:`FuseSummary`: the stems converted (and the patch
        embeddings :func:`fuse_patch_embeddings` converted), those fused
        already, and every candidate left alone with the reason.
    """
    dispatch.check_backend(backend)
    summary = FuseSummary()
    for name, m in list(model.named_modules()):
        # Norms and token drops that a stem took over are part of that stem's conversion.
        if isinstance(m, FusedStem) and not isinstance(m, HandoffModule):
            m.zeta_backend = backend
            summary.already_fused.append((name, f"fused {type(m).__name__}, backend {backend!r}"))
            continue
        for kind in STEM_KINDS:
            if kind.matches(m):
                why = kind.problem(m)
                if why is None:
                    kind.convert(m, backend)
                    summary.converted.append((name, f"whole stem: {kind.name}"))
                else:
                    summary.skipped.append((name, f"whole stem: {kind.name}: {why}"))
                break
    # Inside a stem converted now, the patch embedding is fused with it: neither "fused
    # already" nor an unknown patch convolution.
    stems_now = tuple(f"{name}." if name else "" for name, _ in summary.converted)

    def outside(entries: list) -> list:
        return [e for e in entries if not (stems_now and e[0].startswith(stems_now))]

    inner = fuse_patch_embeddings(model, backend=backend)
    summary.converted += inner.converted
    summary.skipped += outside(inner.skipped)
    summary.already_fused += outside(inner.already_fused)
    return summary


def _is_fused(m: nn.Module) -> bool:
    return isinstance(m, (FusedPatchConv, timm.FusedTimmPatchEmbed))


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
    "fuse_stems",
    "FusedPatchConv1d",
    "FusedPatchConv2d",
    "FusedPatchConv3d",
    "fuse_patch_embeddings",
]
