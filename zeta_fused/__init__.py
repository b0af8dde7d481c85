"""zeta-fused: a fused Triton patch-embedding layer for PyTorch Vision Transformers.

Importing this package never initialises CUDA and works without Triton installed.
"""

from .convert import FuseSummary, fuse_patch_embeddings
from .functional import patch_embed, patch_embed_rows
from .module import FusedPatchSequential, PatchEmbeddings
from .stem_module import ViTStem
from .stems import fuse_stems

__version__ = "0.1.0.dev0"
__all__ = [
    "FuseSummary",
    "FusedPatchSequential",
    "PatchEmbeddings",
    "ViTStem",
    "fuse_patch_embeddings",
    "fuse_stems",
    "patch_embed",
    "patch_embed_rows",
    "__version__",
]
