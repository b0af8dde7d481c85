"""The backward's column partials (docs/design.md, "Backward"): the dZ kernel's programs each
add their tiles' column sums of every vector gradient over D into their own row of a
(len(COLUMN_SUMS), programs, D) buffer (:func:`add_partial`); the dW kernel's column programs
sum the rows in program order (kernels/patch_embed_bwd_params.py). Pure @triton.jit functions.
"""

import triton
import triton.language as tl

from .contract import COLUMN_SUMS
from .gather import READ_BACK

# Rows of the column partials (kernels/contract.py COLUMN_SUMS).
PART_DZ = tl.constexpr(COLUMN_SUMS.index("dz"))
PART_DG2 = tl.constexpr(COLUMN_SUMS.index("dg2"))
PART_DB2 = tl.constexpr(COLUMN_SUMS.index("db2"))
PART_DG3 = tl.constexpr(COLUMN_SUMS.index("dg3"))
PART_DB3 = tl.constexpr(COLUMN_SUMS.index("db3"))


@triton.jit
def add_partial(part, ROW: tl.constexpr, offs_n, n_mask, value):
    """A tile's column sums added into row ROW of this program's partials. ``part``: (this
    program's place in the partials, the distance between two of their rows, whether an earlier
    tile of the program wrote them; else they are stored)."""
    base, row_stride, later = part
    ptrs = base + ROW * row_stride + offs_n
    prev = tl.load(ptrs, mask=n_mask & later, other=0.0, cache_modifier=READ_BACK)
    tl.store(ptrs, prev + value, mask=n_mask)
