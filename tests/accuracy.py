"""The accuracy rule (DESIGN §7): fused error vs an fp64 reference <= 2x the eager error + atol."""

from __future__ import annotations

import torch
from torch import Tensor

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def max_err(t: Tensor, ref: Tensor) -> float:
    return (t.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_accurate(fused: Tensor, eager: Tensor, ref: Tensor, dtype: torch.dtype, what: str = ""):
    """fused and eager in ``dtype``, ref in fp64; NaN only where the reference has it."""
    assert fused.shape == ref.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref.shape)}"
    ref = ref.detach().double().cpu()
    fused, eager = fused.detach().double().cpu(), eager.detach().double().cpu()
    nan = ref.isnan()
    assert torch.equal(fused.isnan(), nan), f"{what}: NaN pattern differs from the reference"
    if nan.all():
        return
    keep = ~nan
    fused_err = max_err(fused[keep], ref[keep])
    eager_err = max_err(eager[keep], ref[keep])
    bound = 2 * eager_err + ATOL[dtype]
    assert fused_err <= bound, (
        f"{what}: fused error {fused_err:.3g} > {bound:.3g} (eager {eager_err:.3g})"
    )
