"""The fused op: its implementation, the torch.library custom ops (fake impls, autograd) that
torch.compile, torch.export, FakeTensor and opcheck see, and the same autograd as a plain
``torch.autograd.Function`` for eager calls (docs/design.md, "Host path").

``zeta_fused::patch_embed_fwd`` takes :class:`~zeta_fused.op.args.FwdArgs` and returns
``(y, stats)``; ``stats`` (len(STAT_ROWS), B*N) holds the fp32 row statistics that the
backward needs.
``zeta_fused::patch_embed_bwd`` takes :class:`~zeta_fused.op.args.BwdArgs` and returns
:class:`~zeta_fused.op.args.Grads`, one per tensor input; those nobody asked for come back as
empty tensors and map to None. Both schemas are derived from the argument descriptions.

CUDA runs the Triton kernels. CPU runs them through the Triton interpreter when
``TRITON_INTERPRET=1`` and the eager reference math otherwise.

An eager call (:func:`dispatcher_free`) runs the implementation without the dispatcher: under
no_grad directly, with autograd through :data:`patch_embed_autograd`, whose forward and backward
are the custom ops' (the same implementation, saved tensors and backward). torch's wrapper of a
custom op's autograd costs far more host time than the kernels' launch (it rebuilds the
22-argument schema once per argument, every call); the custom ops stay what a trace records.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from ..dispatch import interpreting
from ..kernels.contract import STAT_ROWS
from . import reference as ref
from .args import TENSOR_AT, BwdArgs, FwdArgs, Grads, input_grads, schema

LIB = "zeta_fused"

_launch = None  # zeta_fused.op.launch once imported completely (it imports Triton: lazily)


def _launcher(name: str):
    """A launcher of zeta_fused.op.launch, imported on the first fused call. ``import_module``
    makes a thread that arrives while another one is importing it wait for the complete module
    (sys.modules holds the partly initialised one meanwhile); the global is set only once it is
    complete. Looked up per call: tests swap the launchers."""
    global _launch
    if _launch is None:
        _launch = importlib.import_module(".launch", __package__)
    return getattr(_launch, name)


def _implementation(launcher: str, eager: str):
    """The op's implementation on every device it takes: the Triton launcher on CUDA, and on
    the CPU under the interpreter; the eager math on the CPU otherwise. ``options`` go to the
    launcher (the forward's ``with_stats``)."""

    def run(args, **options):
        if args.x.is_cuda or interpreting():
            return _launcher(launcher)(args, **options)
        return getattr(ref, eager)(args)

    return run


fwd_impl = _implementation("patch_embed_fwd", "forward_with_stats")
bwd_impl = _implementation("patch_embed_bwd", "backward_from_stats")


def dispatcher_free(x: Tensor) -> bool:
    """Whether a call with image ``x`` may run the implementation without the dispatcher: not
    traced (torch.compile, torch.export), a plain tensor (FakeTensor, FunctionalTensor and
    other subclasses need the op's registrations), no dispatch mode (FakeTensorMode, a
    profiler's or counter's mode) and no torch.func transform."""
    return (
        type(x) is Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _op(name: str, args: type, returns: int, impl, outputs=None):
    """The custom op ``name`` taking ``args``' fields; ``outputs(inputs, result)``: the schema's
    tensors from the implementation's result."""

    def op_impl(*flat):
        inputs = args(*flat)
        result = impl(inputs)
        return result if outputs is None else outputs(inputs, result)

    op_impl.__name__ = name
    return torch.library.custom_op(
        f"{LIB}::{name}", mutates_args=(), device_types=("cuda", "cpu"),
        schema=schema(args, returns),
    )(op_impl)  # fmt: skip


patch_embed_fwd = _op("patch_embed_fwd", FwdArgs, 2, fwd_impl)


def _grads_or_empty(args: BwdArgs, grads: Grads) -> tuple[Tensor, ...]:
    # The implementation gives None for a gradient nobody needs; the schema returns tensors.
    return tuple(ref.absent_grad(args.weight) if g is None else g for g in grads)


patch_embed_bwd = _op("patch_embed_bwd", BwdArgs, len(Grads._fields), bwd_impl, _grads_or_empty)


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
    ctx.save_for_backward(*(inputs[i] for i in TENSOR_AT), output[1])
    others = list(inputs)  # the other fields as they are (the tensors come back saved)
    for i in TENSOR_AT:
        others[i] = None
    ctx.others = others
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # (the statistics' gradient would be a zeros kernel)


def _backward(ctx, grad_y, _grad_stats):
    if grad_y is None:  # no gradient reached y (materialize_grads is off): none flows back
        return (None,) * len(FwdArgs._fields)
    *tensors, stats = ctx.saved_tensors
    values = ctx.others.copy()
    for i, t in zip(TENSOR_AT, tensors, strict=True):
        values[i] = t
    inputs = tuple.__new__(FwdArgs, values)
    needs_x_grad = ctx.needs_input_grad[0]
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        return _differentiable_backward(inputs, grad_y, ctx.needs_input_grad)
    args = tuple.__new__(BwdArgs, (grad_y, stats, needs_x_grad, *inputs))
    grads = bwd_impl(args) if dispatcher_free(grad_y) else Grads(*patch_embed_bwd(*args))
    return input_grads(grads, inputs, needs_x_grad)


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


class _EagerAutograd(torch.autograd.Function):
    """The custom op's autograd for eager calls: the same implementation, context and
    backward, without the dispatcher."""

    @staticmethod
    def forward(ctx, *flat):
        output = fwd_impl(tuple.__new__(FwdArgs, flat))
        _setup_context(ctx, flat, output)
        return output

    backward = staticmethod(_backward)


# ``patch_embed_autograd(*args)`` is ``patch_embed_fwd(*args)`` with its autograd, for eager
# calls (:func:`dispatcher_free`).
patch_embed_autograd = _EagerAutograd.apply

__all__ = [
    "dispatcher_free",
    "fwd_impl",
    "patch_embed_autograd",
    "patch_embed_bwd",
    "patch_embed_fwd",
]
