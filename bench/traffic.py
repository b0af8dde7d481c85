"""Bytes the fused forward moves, modelled from its loop structure (kernels/patch_embed_fwd.py
and the launch plan of zeta_fused/op/launch.py), against the compulsory bytes of the preset.

The forward's main kernel reads each row block's patches once per column tile (or pair of
tiles), the whole folded weight once per row block, and stores each output row once, plus
once more and a read back per norm over D when a row is wider than a tile; the weight fold
reads and writes the weight once. tests/op/test_forward_traffic.py checks this model against the
bytes the interpreter counts, and the model against the targets of docs/design.md
("Forward main loop").
"""

from __future__ import annotations

import math

from zeta_fused.kernels.contract import STAT_ROWS
from zeta_fused.op import layout
from zeta_fused.op.plan import fwd_plan
from zeta_fused.op.policy import LaunchPolicy

from .presets import Preset


def forward_traffic(p: Preset, pol: LaunchPolicy, pre_norm: bool = True, post_norm: bool = True,
                    with_stats: bool = False) -> dict[str, int]:  # fmt: skip
    """Loads and stores (bytes) of the fused forward of ``p`` (a PatchEmbeddings preset: the
    norms given, a bias) under the launch policy ``pol``, per operand of the main kernel:
    "X loads", "W loads", "Y loads", "Y stores", "stats stores", "vector loads"; "fold" (the
    weight fold's bytes, with a pre-norm); "total", and "compulsory" (the preset's)."""
    size = p.torch_dtype.itemsize
    blocks = pol.blocks(size)
    tokens, k, d = p.batch * p.tokens, p.patch_dim, p.dim
    plan = fwd_plan(tokens, d, blocks, pol.small_grid, pol.fwd_target_programs)
    image = p.input_elems() * size
    # Passes over a row block's patches: one per column tile, or per pair of them.
    passes = plan.splits * math.ceil(plan.tiles_per_program / (2 if plan.pair else 1))
    row_len = layout.aligned_row_len(k)
    read_per_row = min(math.ceil(k / blocks.fwd_k) * blocks.fwd_k, row_len)
    out = tokens * d * size
    sweeps = 0 if plan.block_n >= d else int(post_norm)
    vectors = (int(pre_norm) + 1 + 2 * int(post_norm)) * d * 4  # s, b' (or bias), post-norm's
    pivot = tokens * size if pre_norm else 0  # the first element of each patch
    traffic = {
        "X loads": image * passes + pivot,
        "W loads": d * read_per_row * size * plan.row_blocks,
        "Y loads": out * sweeps,
        "Y stores": out * (1 + sweeps),
        "stats stores": len(STAT_ROWS) * tokens * 4 if with_stats else 0,
        "vector loads": vectors * plan.row_blocks,
        "fold": (d * k + d * row_len) * size + 2 * k * size if pre_norm else 0,
    }
    traffic["total"] = sum(traffic.values())
    traffic["compulsory"] = p.bytes()
    return traffic
