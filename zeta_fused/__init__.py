"""zeta-fused: a fused Triton patch-embedding layer for PyTorch Vision Transformers.

Importing this package never initialises CUDA and works without Triton installed.
"""

from .functional import patch_embed
from .module import PatchEmbeddings

__version__ = "0.1.0.dev0"
__all__ = ["PatchEmbeddings", "patch_embed", "__version__"]
