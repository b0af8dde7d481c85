"""Casts and the tensor-core product shared by the kernels, correct under the Triton
interpreter too.

The interpreter converts fp32 -> bf16 by truncation, while GPUs round to nearest even; with
EMULATE_BF16 the rounding is done on the fp32 bits first, so the cast that follows is exact.
"""

import triton
import triton.language as tl

# fp32 keeps 16 more mantissa bits than bf16; rounding adds half of the dropped range (0x7FFF)
# plus the lowest kept bit (ties to even), then clears the dropped bits. (constexpr: compiled
# kernels may only read globals that are.)
BF16_DROPPED_BITS = tl.constexpr(16)
BF16_HALF_ULP = tl.constexpr(0x7FFF)
BF16_KEEP_MASK = tl.constexpr(0xFFFF0000)


@triton.jit
def cast(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x.to(DTYPE) with round-to-nearest-even for bf16 on every backend (EMULATE_BF16: done
    on the fp32 bits, for the interpreter)."""
    if EMULATE_BF16 and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += BF16_HALF_ULP + ((bits >> BF16_DROPPED_BITS) & 1)
        x = (bits & BF16_KEEP_MASK).to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def mma(acc, a, b, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):  # fmt: skip
    """acc + a @ b with both operands rounded to COMPUTE_DTYPE and accumulated in ACC_DTYPE
    (tensor cores on a GPU). EMULATE_BF16 (the interpreter, whose bf16 tl.dot is wrong): the
    products of the rounded operands run in ACC_DTYPE. out_dtype is explicit: Triton 3.6
    defaults it to fp32 for fp64 too."""
    a = cast(a, COMPUTE_DTYPE, EMULATE_BF16)
    b = cast(b, COMPUTE_DTYPE, EMULATE_BF16)
    if EMULATE_BF16:
        acc += tl.dot(a.to(ACC_DTYPE), b.to(ACC_DTYPE), out_dtype=ACC_DTYPE)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc
