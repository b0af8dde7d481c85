"""The kernels' bf16 cast rounds to nearest even, also under the interpreter (which truncates)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from support import layer_norm

from zeta_fused.dispatch import interpreting
from zeta_fused.functional import op_inputs
from zeta_fused.kernels.rounding import cast
from zeta_fused.op.args import FwdArgs

# Subnormals are left out: the interpreter flushes them, and no output of ours is subnormal.
SPECIALS = [float("nan"), float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 0.0, -0.0]


@triton.jit
def _cast_bf16_kernel(X, Y, N, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(Y + offs, cast(tl.load(X + offs, mask=mask), tl.bfloat16, EMULATE_BF16), mask=mask)


def test_bf16_cast_is_round_to_nearest_even(device) -> None:
    x = torch.cat([torch.randn(5000) * 10, torch.tensor(SPECIALS)]).to(device)
    # Exact ties: bf16 value + half an ulp must go to the even neighbour.
    ties = (torch.arange(1, 257, dtype=torch.float32) * 2**-7 + 2**-9).to(device)
    x = torch.cat([x, ties, -ties])
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _cast_bf16_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), interpreting(), 1024)
    expected = x.bfloat16()
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("post_norm", [True, False])
def test_fused_bf16_output_rounds_to_nearest(post_norm, device) -> None:
    """The fused output is the nearest bf16 to its fp32 result almost everywhere (truncation
    would miss about half of the elements)."""
    from zeta_fused.op import reference

    m = torch.nn.Linear(48, 64).to(device, torch.bfloat16)
    x = torch.randn(2, 3, 16, 16, device=device, dtype=torch.bfloat16)
    ln = (
        torch.ones(64, device=device, dtype=torch.bfloat16),
        torch.zeros(64, device=device, dtype=torch.bfloat16),
    )
    args = op_inputs(x, (4, 4), m.weight, m.bias, None, layer_norm(*ln) if post_norm else None)
    y, _ = torch.ops.zeta_fused.patch_embed_fwd(*args)
    exact, _ = reference.forward_with_stats(
        FwdArgs(*(a.cpu().double() if isinstance(a, torch.Tensor) else a for a in args))._replace(
            compute_dtype=torch.float64, out_dtype=torch.float64
        )
    )
    nearest = (y.cpu() == exact.bfloat16()).float().mean().item()
    assert nearest > 0.95, f"only {nearest:.0%} of outputs are the nearest bf16"
