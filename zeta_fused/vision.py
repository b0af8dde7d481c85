"""Mirror of zeta's ``zeta.vision`` import path."""

from .nn.patch_embed import PatchEmbeddings

__all__ = ["PatchEmbeddings"]
