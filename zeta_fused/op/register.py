"""torch.library custom ops for the fused patch embedding: registration, fake impls, autograd.

``zeta_fused::patch_embed_fwd`` takes :class:`~zeta_fused.op_args.FwdArgs` and returns
``(y, stats)``; ``stats`` (len(STAT_ROWS), B*N) holds the fp32 row statistics that the
backward needs.
``zeta_fused::patch_embed_bwd`` takes :class:`~zeta_fused.op_args.BwdArgs` and returns
:class:`~zeta_fused.op_args.Grads`, one per tensor input; those nobody asked for come back as
empty tensors and map to None. Both schemas are derived from the argument descriptions.

CUDA runs the Triton kernels. CPU runs them through the Triton interpreter when
``TRITON_INTERPRET=1`` and the eager reference math otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..dispatch import interpreting
from ..kernels.contract import STAT_ROWS
from . import reference as ref
from .args import TENSOR_FIELDS, BwdArgs, FwdArgs, Grads, input_grads, schema

LIB = "zeta_fused"


def _op(name: str, args: type, returns: int, launcher: str, eager: str):
    """A custom op taking ``args``' fields: CUDA runs the Triton launcher; CPU runs it under the
    interpreter and the eager math otherwise (both looked up per call: tests swap them)."""

    def on_cuda(*flat):
        from . import launch

        return getattr(launch, launcher)(args(*flat))

    def on_cpu(*flat):
        if interpreting():
            from . import launch

            return getattr(launch, launcher)(args(*flat))
        return getattr(ref, eager)(args(*flat))

    on_cuda.__name__ = name
    op = torch.library.custom_op(
        f"{LIB}::{name}", mutates_args=(), device_types="cuda", schema=schema(args, returns)
    )(on_cuda)
    op.register_kernel("cpu")(on_cpu)
    return op


patch_embed_fwd = _op("patch_embed_fwd", FwdArgs, 2, "patch_embed_fwd", "forward_with_stats")
patch_embed_bwd = _op("patch_embed_bwd", BwdArgs, len(Grads._fields), "patch_embed_bwd",
                      "backward_from_stats")  # fmt: skip


@patch_embed_fwd.register_fake
def _fwd_fake(*flat):
    a = FwdArgs(*flat)
    batch, grid = a.x.shape[0], [s // p for s, p in zip(a.x.shape[2:], a.patch, strict=True)]
    tokens = math.prod(grid) if a.keep is None else a.keep.shape[1]
    rows = tokens if a.prefix is None else a.prefix.shape[0] + tokens
    y = a.x.new_empty((batch, rows, a.weight.shape[0]), dtype=a.out_dtype)
    stats = a.x.new_empty((len(STAT_ROWS), batch * tokens), dtype=ref.stats_dtype(a.compute_dtype))
    return y, stats


@patch_embed_bwd.register_fake
def _bwd_fake(*flat):
    a = BwdArgs(*flat)

    def like(name: str) -> Tensor:
        t = getattr(a, name)
        wanted = t is not None and (name != "x" or a.needs_x_grad)
        return t.new_empty(t.shape) if wanted else ref.absent_grad(a.weight)

    return tuple(like(name) for name in Grads._fields)


def _setup_context(ctx, inputs, output):
    # Saved: the inputs and the per-token statistics (STAT_ROWS); Z (B, N, D) is recomputed by the
    # backward's dZ kernel rather than kept (docs/design.md, "Memory").
    a = FwdArgs(*inputs)
    ctx.save_for_backward(*(getattr(a, name) for name in TENSOR_FIELDS), output[1])
    ctx.others = {n: v for n, v in a._asdict().items() if n not in TENSOR_FIELDS}
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_stats):
    *tensors, stats = ctx.saved_tensors
    inputs = FwdArgs(**dict(zip(TENSOR_FIELDS, tensors, strict=True)), **ctx.others)
    needs_x_grad = ctx.needs_input_grad[0]
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        return _differentiable_backward(inputs, grad_y, ctx.needs_input_grad)
    grads = patch_embed_bwd(*BwdArgs(grad_y, stats, needs_x_grad, *inputs))
    return input_grads(Grads(*grads), inputs, needs_x_grad)


def _differentiable_backward(inputs: FwdArgs, grad_y: Tensor, needs: tuple[bool, ...]) -> tuple:
    """Double backward (``create_graph=True``, e.g. a gradient penalty on the images): the
    gradients as a graph of eager ops, from the forward's eager math run again on the saved
    inputs, so that they can be differentiated once more. Eager speed, fused semantics
    (the same dtypes and roundings)."""
    wanted = [
        name
        for name, need in zip(FwdArgs._fields, needs, strict=True)
        if need and isinstance(getattr(inputs, name), Tensor)
    ]
    y = ref.forward_with_stats(inputs)[0]
    grads = torch.autograd.grad(
        y, [getattr(inputs, n) for n in wanted], grad_y, create_graph=True, allow_unused=True
    )
    by_name = dict(zip(wanted, grads, strict=True))
    return tuple(by_name.get(name) for name in FwdArgs._fields)


patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["patch_embed_bwd", "patch_embed_fwd"]
