"""Segment Anything: whole stem of ``ImageEncoderViT``: ``patch_embed`` (NHWC) plus
``pos_embed`` as one fused call, the op's (B, N, D) tokens viewed as the peer's (B, Hp, Wp, D).
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import dispatch
from ..nn.params import param, plain
from ..op.args import Stem
from ._base import FusedStem, StemKind, conv_stem, is_instance, overrides, peer_class, swapper
from .convs import patch_conv_problem

_SAM = "segment_anything.modeling.image_encoder"


class _FusedSamImageEncoder(FusedStem):
    """Segment Anything ``ImageEncoderViT`` with patch_embed and pos_embed fused: the op's
    (B, N, D) tokens viewed as the peer's (B, Hp, Wp, D)."""

    def try_fused(self, x: Tensor) -> Tensor | None:
        """The fused (B, Hp, Wp, D) tokens, or None: the peer's forward runs."""
        embed = self.patch_embed
        if x.ndim != 4 or not plain(embed, peer_class(_SAM, "PatchEmbed")):
            return None
        conv = embed.proj
        if patch_conv_problem(conv) is not None or not self.zeta_fusable(x, embed, conv):
            return None  # (a proj replaced or changed in place: the peer's code)
        grid = (x.shape[2] // conv.kernel_size[0], x.shape[3] // conv.kernel_size[1])
        pos = param(self, "pos_embed")  # (1, Hp, Wp, D) or None
        if pos is not None:
            if pos.ndim != 4 or tuple(pos.shape[:3]) != (1, *grid):
                return None  # another grid: the peer broadcasts it or raises
            pos = pos.flatten(0, 2)
        y = conv_stem(x, conv, lambda _: Stem(pos, None, None))
        return None if y is None else y.view(y.shape[0], *grid, y.shape[-1])

    @dispatch.traced_as_peer
    def forward(self, x: Tensor) -> Tensor:
        tokens = self.try_fused(x)
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


STEM_KINDS = (
    StemKind("Segment Anything ImageEncoderViT", is_instance(_SAM, "ImageEncoderViT"),
             _sam_problem, swapper(_FusedSamImageEncoder)),
)  # fmt: skip
