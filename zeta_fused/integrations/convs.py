"""The fused patch convolutions every conv-based library shares: :class:`FusedPatchConv1d` /
``2d`` / ``3d``, a ConvNd with kernel = stride = patch (transformers' ViT, DeiT, DINOv2, CLIP,
SigLIP, VideoMAE, ViViT, V-JEPA 2, Qwen-VL projections, diffusers' Wan and HunyuanVideo ones),
which ``fuse_patch_embeddings`` swaps in by changing the conv's class (the same object,
Parameters and state-dict keys), its callers staying as they are; and the helpers that read a
patch conv for the whole stems.

Each call runs the original forward where the fused op would not give the same thing
(docs/design.md, "Drop-in rule"): hooks on a child, a child replaced by one that cannot be
fused, or a PyTorch feature the op does not take part in.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import dispatch
from ..checks import check_input
from ..functional import fused_call
from ..nn.params import param, plain

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


def conv_runs_itself(x: Tensor, patch: tuple[int, ...]) -> bool:
    """The original module must handle ``x`` itself: an unbatched input, or one smaller than
    one patch (the conv raises its own error for those)."""
    return x.ndim != len(patch) + 2 or any(s < p for s, p in zip(x.shape[2:], patch, strict=True))


def patch_grid(x: Tensor, patch: tuple[int, ...]) -> list[int]:
    """The patch grid a stride-patch conv gives for ``x`` (B, C, *spatial): patches per spatial
    dimension. A list, not a generator: torch.compile does not trace ``math.prod`` over one."""
    return [s // p for s, p in zip(x.shape[2:], patch, strict=True)]


def crop_to_grid(x: Tensor, patch: tuple[int, ...]) -> Tensor:
    """What a stride-patch conv sees: the remainder at the end of each dimension is dropped."""
    if not any(s % p for s, p in zip(x.shape[2:], patch, strict=True)):
        return x
    return x[(..., *(slice(0, s // p * p) for s, p in zip(x.shape[2:], patch, strict=True)))]


def to_format(y: Tensor, x: Tensor, patch: tuple[int, ...], fmt: str) -> Tensor:
    """(B, N, D) tokens as timm's output formats or a conv's (B, D, *grid) (views, no copies)."""
    if fmt == "NLC":
        return y
    if fmt == "NCL":
        return y.transpose(1, 2)
    tokens = y.view(y.shape[0], *patch_grid(x, patch), y.shape[-1])
    return tokens if fmt == "NHWC" else tokens.movedim(-1, 1)


class FusedPatchConv(dispatch.NotScriptable):
    """A ConvNd with kernel = stride = patch computed by the fused op (the base of
    :class:`FusedPatchConv1d` / ``2d`` / ``3d``). Returns the conv's values as a channels-last
    (B, D, *grid) tensor, so ``.flatten(2).transpose(1, 2)`` is free. Its own hooks run as for
    any module call."""

    zeta_backend: str = "auto"

    @dispatch.traced_as_peer
    def forward(self, x: Tensor) -> Tensor:
        patch = self.kernel_size
        if (
            conv_runs_itself(x, patch)
            or patch_conv_problem(self) is not None  # stride, padding... may change in place
            or not dispatch.use_fused(self.zeta_backend, x)
        ):
            return super().forward(x)
        x = crop_to_grid(x, patch)
        check_input(x, self.in_channels, patch, False)
        weight, bias = param(self, "weight"), param(self, "bias")
        shape = (self.out_channels, self.in_channels, *patch)
        y = fused_call(x, patch, weight, shape, bias)
        return super().forward(x) if y is None else to_format(y, x, patch, "NCHW")


class FusedPatchConv1d(FusedPatchConv, nn.Conv1d):
    """A Conv1d with kernel = stride = patch, fused (sequences)."""


class FusedPatchConv2d(FusedPatchConv, nn.Conv2d):
    """A Conv2d with kernel = stride = patch, fused (images)."""


class FusedPatchConv3d(FusedPatchConv, nn.Conv3d):
    """A Conv3d with kernel = stride = patch, fused (video tubelets, volumes, pre-cut rows)."""


FUSED_CONVS = (FusedPatchConv1d, FusedPatchConv2d, FusedPatchConv3d)


def fuse_conv(conv: nn.Module, backend: str) -> None:
    """Swap a plain patch ConvNd's class for its fused one (same object and Parameters)."""
    conv.__class__ = FUSED_CONVS[CONVS.index(type(conv))]
    conv.zeta_backend = backend


# The libraries whose modules keep their patch projection conv under one of these names: it
# is converted wherever it is a patch conv (kernel = stride), the module's forward unchanged.
CONV_LIBRARIES = ("transformers.", "diffusers.")
PATCH_CONV_NAMES = ("projection", "patch_embedding", "proj", "patch_embed")


def library_patch_conv(m: nn.Module) -> str | None:
    """The attribute holding a transformers or diffusers module's projection conv, or None: a
    patch conv (kernel = stride, more than one pixel: the 1x1 ``projection`` convs of DPT,
    Depth Anything and ZoeDepth necks map pixels), or any conv of an embedding class
    (``*Embed*``), whose overlap or padding the summary then reports."""
    if not type(m).__module__.startswith(CONV_LIBRARIES):
        return None
    for attr in PATCH_CONV_NAMES:
        conv = m._modules.get(attr)
        if isinstance(conv, CONVS) and (
            (conv.kernel_size == conv.stride and max(conv.kernel_size) > 1)
            or "Embed" in type(m).__name__
        ):
            return attr
    return None
