"""The fused op's inputs, described once (docs/design.md, "The op").

``FwdArgs`` lists the forward's inputs in schema order; the backward's inputs (``BwdArgs``)
and its outputs (``Grads``: one gradient per tensor input) are derived from it, and so are the
``torch.library`` schema strings, which must stay flat. Callers describe a call with values
(:class:`Norm` for each norm, :class:`Stem` for the rest of a whole stem) and
:func:`fwd_args` lays them out flat, the one place besides the class that knows the field order;
code that reads the tuples reads them by field name (or as Norm values, :meth:`FwdArgs.norm`).
Adding an input: a field here and its place in :func:`fwd_args`, then the code that uses it.
"""

from __future__ import annotations

import typing
from typing import Annotated, NamedTuple

import torch
from torch import Tensor

from ..kernels.contract import NO_NORM


class Norm(NamedTuple):
    """A norm over the last dimension, as a value (docs/design.md, "Norms"). None stands for no
    norm wherever a Norm is expected."""

    kind: str  # kernels/contract.py NORM_KINDS: LAYER_NORM or RMS_NORM
    weight: Tensor | None  # None: no affine weight
    bias: Tensor | None  # None: no affine bias (an RMSNorm has none)
    eps: float


class Stem(NamedTuple):
    """What a whole ViT stem adds after the patch embedding (see ``patch_embed``)."""

    pos: Tensor | None  # (N, D) position table of the patch tokens; (T, D) with pos_index
    prefix: Tensor | None  # (P, D) rows before every image's patch tokens
    norm: Norm | None  # the stem norm, over D of every output row
    # (B, rows) int64: the table row of each patch token (packed or variable-resolution
    # rows); None: the row of its grid position.
    pos_index: Tensor | None = None


NO_STEM = Stem(None, None, None)

# Marks a tensor input that takes no gradient (an index): no slot in Grads.
NO_GRAD = "no gradient"


class FwdArgs(NamedTuple):
    """Inputs of ``zeta_fused::patch_embed_fwd``, in schema order."""

    x: Tensor  # image (B, C, *spatial), any strides
    weight: Tensor  # (D, K) with K in (*patch, C) order, or a conv weight (D, C, *patch)
    bias: Tensor | None  # (D,)
    pre_norm: str  # kernels/contract.py NORM_KINDS: the norm over each flattened patch (K)
    g1: Tensor | None  # its weight (K,) in (*patch, C) order; None: no affine weight
    b1: Tensor | None  # its bias (K,)
    pre_eps: float
    post_norm: str  # NORM_KINDS: the norm over each token (D)
    g2: Tensor | None  # (D,)
    b2: Tensor | None  # (D,)
    post_eps: float
    pos: Tensor | None  # (N, D) position table added to every image's tokens after post_norm
    prefix: Tensor | None  # (P, D) rows put before every image's tokens (class, registers)
    # (B, L) int64: the grid positions each image embeds, in output order (any order, repeats
    # allowed); each token takes its position's table row. None: all N, in grid order.
    keep: Annotated[Tensor | None, NO_GRAD]
    # (B, rows) int64: the table row of each patch token; None: its grid position's row.
    pos_index: Annotated[Tensor | None, NO_GRAD]
    stem_norm: str  # NORM_KINDS: the norm over D of every output row, prefix rows included
    g3: Tensor | None  # (D,)
    b3: Tensor | None  # (D,)
    stem_eps: float
    patch: list[int]  # patch size per spatial dimension
    compute_dtype: torch.dtype  # GEMM operand dtype (fp32 accumulation, fp64 for fp64)
    out_dtype: torch.dtype

    def norm(self, which: str) -> Norm | None:
        """The "pre", "post" or "stem" norm as a value; None when it is off."""
        kind, weight, bias, eps = (getattr(self, f) for f in _NORM_FIELDS[which])
        return None if kind == NO_NORM else Norm(kind, weight, bias, eps)


# The fields of each norm, in Norm's order.
_NORM_FIELDS = {
    "pre": ("pre_norm", "g1", "b1", "pre_eps"),
    "post": ("post_norm", "g2", "b2", "post_eps"),
    "stem": ("stem_norm", "g3", "b3", "stem_eps"),
}
# The flat fields of no norm (the eps is never read).
_OFF = (NO_NORM, None, None, 0.0)


def fwd_args(x: Tensor, weight: Tensor, bias: Tensor | None, pre: Norm | None,
             post: Norm | None, stem: Stem, keep: Tensor | None,
             patch: tuple[int, ...] | list[int], compute_dtype: torch.dtype,
             out_dtype: torch.dtype) -> FwdArgs:  # fmt: skip
    """The op's flat inputs from values. Built with tuple.__new__: FwdArgs' own __new__ is a
    Python function of keywords, on the per-call path."""
    return tuple.__new__(FwdArgs, (
        x, weight, bias, *(pre or _OFF), *(post or _OFF), stem.pos, stem.prefix, keep,
        stem.pos_index,
        *(stem.norm or _OFF), patch, compute_dtype, out_dtype,
    ))  # fmt: skip


class _BwdExtra(NamedTuple):
    # (B, P + L, D), any strides; L = N without keep. A broadcast one (stride 0) is made dense
    # by the launcher (its kernels would otherwise be specialised apart: launch.py).
    grad_y: Tensor
    stats: Tensor  # (len(STAT_ROWS), B*L) row statistics saved by the forward
    needs_x_grad: bool  # compute the image gradient (its own kernel)


# The backward takes what the forward took, after the upstream gradient and the statistics.
BwdArgs = NamedTuple(
    "BwdArgs", [*typing.get_type_hints(_BwdExtra).items(), *typing.get_type_hints(FwdArgs).items()]
)
BwdArgs.__doc__ = (
    "Inputs of ``zeta_fused::patch_embed_bwd``: grad_y, stats, needs_x_grad, then FwdArgs."
)

_HINTS = typing.get_type_hints(FwdArgs, include_extras=True)
# Every tensor input (saved for the backward), and those that take a gradient.
TENSOR_FIELDS = tuple(
    name
    for name, hint in typing.get_type_hints(FwdArgs).items()
    if Tensor in (hint, *typing.get_args(hint))
)
# Their positions in FwdArgs.
TENSOR_AT = tuple(FwdArgs._fields.index(name) for name in TENSOR_FIELDS)
GRAD_FIELDS = tuple(
    name for name in TENSOR_FIELDS if NO_GRAD not in getattr(_HINTS[name], "__metadata__", ())
)
# The backward's outputs: a gradient per differentiable tensor input, an empty tensor where
# none is computed.
Grads = NamedTuple("Grads", [(name, Tensor) for name in GRAD_FIELDS])
Grads.__doc__ = "Outputs of ``zeta_fused::patch_embed_bwd``: one per differentiable tensor input."


_EXTRA = len(_BwdExtra._fields)


def fwd_of(args: BwdArgs) -> FwdArgs:
    """The forward's inputs inside the backward's."""
    return tuple.__new__(FwdArgs, args[_EXTRA:])  # (FwdArgs' own __new__ is Python: per call)


# Where each gradient's input is in FwdArgs.
_GRAD_AT = tuple(FwdArgs._fields.index(name) for name in Grads._fields)
_X_AT = FwdArgs._fields.index("x")


def input_grads(grads: Grads, inputs: FwdArgs, needs_x_grad: bool) -> tuple:
    """autograd's answer for every forward input: the gradient, or None for non-tensor inputs,
    absent tensors and an image that needs none."""
    out = [None] * len(inputs)
    for at, grad in zip(_GRAD_AT, grads, strict=True):  # (per-call path: positions, not names)
        if inputs[at] is not None:
            out[at] = grad
    if not needs_x_grad:
        out[_X_AT] = None
    return tuple(out)


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
