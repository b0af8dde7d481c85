"""Mirror of zeta's ``zeta.vision`` import path."""

from .module import PatchEmbeddings

__all__ = ["PatchEmbeddings"]
