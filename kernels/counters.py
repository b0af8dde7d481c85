"""Integer counters that pick the program finishing a sum several programs share: a program
stores its part, then counts itself in; the last one to arrive reads every part (through L2,
gather.READ_BACK) and finishes. The counters only pick who finishes; the parts are summed in a
fixed order whoever does, so results do not depend on the programs' timing. An earlier kernel
of the same call zeroes them (:func:`zero`). Pure @triton.jit functions, no launches."""

import triton
import triton.language as tl


@triton.jit
def zero(Out, n, BLOCK: tl.constexpr):
    """Zeroes n elements of Out: counters for a later kernel of the call, or anything it reads
    as zeros."""
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.store(Out + offs, tl.zeros([BLOCK], dtype=Out.dtype.element_ty), mask=offs < n)


@triton.jit
def arrived_last(Counter, arrivals):
    """Counts this program in at Counter; True for the last of ``arrivals`` programs. The CTA
    barrier orders every thread's earlier stores before the increment, a GPU-scope
    release-acquire atomic, so the last program sees every part stored before it."""
    tl.debug_barrier()
    return tl.atomic_add(Counter, 1) == arrivals - 1
