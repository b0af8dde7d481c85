"""zeta-fused: a fused Triton patch-embedding layer for PyTorch Vision Transformers.

Importing this package never initialises CUDA and works without Triton installed.
"""

from . import _legacy
from .functional import patch_embed, patch_embed_rows
from .integrations.convert import FuseSummary, fuse_patch_embeddings, fuse_stems
from .nn.patch_embed import FusedPatchSequential, PatchEmbeddings
from .nn.vit_stem import ViTStem
from .op.args import Norm
from .op.tuning import tuning
from .op.warmup import WarmupReport, warmup

_legacy.install()  # old module paths, for models pickled before the package was split

__version__ = "0.1.0.dev0"
__all__ = [
    "FuseSummary",
    "FusedPatchSequential",
    "Norm",
    "PatchEmbeddings",
    "ViTStem",
    "WarmupReport",
    "fuse_patch_embeddings",
    "fuse_stems",
    "patch_embed",
    "patch_embed_rows",
    "tuning",
    "warmup",
    "__version__",
]
