"""The fused op's inputs, described once (docs/design.md, "The op").

``FwdArgs`` lists the forward's inputs in schema order; the backward's inputs (``BwdArgs``)
and its outputs (``Grads``: one gradient per tensor input) are derived from it, and so are the
``torch.library`` schema strings, which must stay flat. Every caller (custom ops, launchers,
the eager reference, the functional API, the benchmark, the AOT-compile harness, the tests)
builds and reads these tuples by field name. Adding an input: a field here, then the code
that uses it.
"""

from __future__ import annotations

import typing
from typing import NamedTuple

import torch
from torch import Tensor


class FwdArgs(NamedTuple):
    """Inputs of ``zeta_fused::patch_embed_fwd``, in schema order."""

    x: Tensor  # image (B, C, *spatial), any strides
    weight: Tensor  # (D, K) with K in (*patch, C) order, or a conv weight (D, C, *patch)
    bias: Tensor | None  # (D,)
    pre_norm: str  # kernels/contract.py NORM_KINDS: the norm over each flattened patch (K)
    g1: Tensor | None  # its weight (K,) in (*patch, C) order; None: no affine weight
    b1: Tensor | None  # its bias (K,)
    post_norm: str  # NORM_KINDS: the norm over each token (D)
    g2: Tensor | None  # (D,)
    b2: Tensor | None  # (D,)
    pos: Tensor | None  # (N, D) position table added to every image's tokens after post_norm
    prefix: Tensor | None  # (P, D) rows put before every image's tokens (class, registers)
    stem_norm: str  # NORM_KINDS: the norm over D of every output row, prefix rows included
    g3: Tensor | None  # (D,)
    b3: Tensor | None  # (D,)
    patch: list[int]  # patch size per spatial dimension
    eps: float  # pre_norm and post_norm
    stem_eps: float  # stem_norm
    compute_dtype: torch.dtype  # GEMM operand dtype (fp32 accumulation, fp64 for fp64)
    out_dtype: torch.dtype


class _BwdExtra(NamedTuple):
    grad_y: Tensor  # (B, P + N, D), any strides (stride 0 included)
    stats: Tensor  # (len(STAT_ROWS), B*N) row statistics saved by the forward
    needs_x_grad: bool  # compute the image gradient (its own kernel)


# The backward takes what the forward took, after the upstream gradient and the statistics.
BwdArgs = NamedTuple(
    "BwdArgs", [*typing.get_type_hints(_BwdExtra).items(), *typing.get_type_hints(FwdArgs).items()]
)
BwdArgs.__doc__ = (
    "Inputs of ``zeta_fused::patch_embed_bwd``: grad_y, stats, needs_x_grad, then FwdArgs."
)

TENSOR_FIELDS = tuple(
    name
    for name, hint in typing.get_type_hints(FwdArgs).items()
    if Tensor in (hint, *typing.get_args(hint))
)
# The backward's outputs: a gradient per tensor input, an empty tensor where none is computed.
Grads = NamedTuple("Grads", [(name, Tensor) for name in TENSOR_FIELDS])
Grads.__doc__ = "Outputs of ``zeta_fused::patch_embed_bwd``: one per tensor field of FwdArgs."


def fwd_of(args: BwdArgs) -> FwdArgs:
    """The forward's inputs inside the backward's."""
    return FwdArgs(*args[len(_BwdExtra._fields) :])


def input_grads(grads: Grads, inputs: FwdArgs, needs_x_grad: bool) -> tuple:
    """autograd's answer for every forward input: the gradient, or None for non-tensor inputs,
    absent tensors and an image that needs none."""
    out = dict.fromkeys(FwdArgs._fields)
    for name, grad in zip(Grads._fields, grads, strict=True):
        if getattr(inputs, name) is not None and (name != "x" or needs_x_grad):
            out[name] = grad
    return tuple(out.values())


_SCHEMA_TYPES = {
    Tensor: "Tensor",
    Tensor | None: "Tensor?",
    list[int]: "int[]",
    float: "float",
    bool: "bool",
    str: "str",
    torch.dtype: "ScalarType",
}


def schema(args: type, returns: int) -> str:
    """The flat torch.library schema of a function taking ``args``' fields, returning
    ``returns`` tensors."""
    params = ", ".join(
        f"{_SCHEMA_TYPES[hint]} {name}" for name, hint in typing.get_type_hints(args).items()
    )
    return f"({params}) -> ({', '.join(['Tensor'] * returns)})"
