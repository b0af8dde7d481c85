"""Deterministic sums of rows by segment: ``out[s] = sum(rows[order[j]] for j in bounds[s] ..
bounds[s + 1])``, added in that fixed order in ACC_DTYPE and cast once. With token subsets
(docs/design.md, "Token subsets") the gradient of a position table read at the kept positions,
and that of the patches a keep index repeats, are such sums: this gives them without atomics,
the same bits on every run. Device code only: the launcher sorts the rows by segment."""

import triton
import triton.language as tl

from .rounding import cast


@triton.jit
def _segment_sum_kernel(
    Rows, stride_row,  # (R, W) rows, any row stride, unit column stride
    Order,  # (R,) int64: row indices, grouped by segment (a stable sort of their segments)
    Bounds,  # (S + 1,) int64: segment s is Order[Bounds[s] : Bounds[s + 1]]
    Out, stride_out,  # out: (S, W), zero for an empty segment
    W,
    ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    segment = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = offs < W
    acc = tl.zeros([BLOCK_W], dtype=ACC_DTYPE)
    for j in range(tl.load(Bounds + segment), tl.load(Bounds + segment + 1)):
        row = tl.load(Order + j)
        acc += tl.load(Rows + row * stride_row + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(Out + segment * stride_out + offs, cast(acc, Out.dtype.element_ty, EMULATE_BF16),
             mask=mask)  # fmt: skip
