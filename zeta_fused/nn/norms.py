"""Norm modules as the op's norm values (docs/design.md, "Norms"): the one place that knows which
module classes compute which norm kind, how to read their parameters and epsilon, and why one
cannot be fused. Peers' classes are recognised by module and name, so nothing here imports a
peer library.

A module is a norm the op computes when its forward is the class's own (a subclass overriding
it computes something else), it normalises over the last dimension only, and any option that
changes its numerics (timm's fast-norm paths) is off.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..checks import norm_eps
from ..kernels.contract import LAYER_NORM, RMS_NORM
from ..op.args import Norm
from .params import param

# Peers' norm classes by (module, class name): their kind, and the attribute holding the eps.
# Each computes F.layer_norm / an RMSNorm over the last dimension as the op does (read from
# their sources): timm's LayerNorm and RmsNorm without fast norm; OpenCLIP's LayerNorm and
# LayerNormFp32 (in fp32, then cast back to the input's dtype: integrations/open_clip.py
# keeps that cast); the T5-style RMSNorms of transformers' vision towers (fp32 statistics,
# weight * x̂; no bias).
_PEER_NORMS = {
    ("timm.layers.norm", "LayerNorm"): (LAYER_NORM, "eps"),
    ("timm.layers.norm", "RmsNorm"): (RMS_NORM, "eps"),
    ("open_clip.transformer", "LayerNorm"): (LAYER_NORM, "eps"),
    ("open_clip.transformer", "LayerNormFp32"): (LAYER_NORM, "eps"),
    ("transformers.models.aimv2.modeling_aimv2", "Aimv2RMSNorm"): (RMS_NORM, "variance_epsilon"),
    ("transformers.models.pixtral.modeling_pixtral", "PixtralRMSNorm"): (RMS_NORM,
                                                                         "variance_epsilon"),
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"): (RMS_NORM, "variance_epsilon"),
}  # fmt: skip
# The T5-style RMSNorms return weight * x̂ rounded to the input's dtype: their output takes the
# weight's dtype where it is wider, which the op's dtype rule does not follow under autocast
# (an fp32 weight gives an fp32 output from bf16 tokens): such calls run eager.
_WEIGHT_DECIDES_DTYPE = {key for key, (kind, eps) in _PEER_NORMS.items()
                         if eps == "variance_epsilon"}  # fmt: skip
_TORCH_NORMS = ((nn.LayerNorm, LAYER_NORM), (nn.RMSNorm, RMS_NORM))


@functools.cache  # by class: the modules ask on every call
def _peer_norm(cls: type) -> tuple[type, str, str] | None:
    """(the peer class, kind, eps attribute) of a peer norm class ``cls`` derives from."""
    for base in cls.__mro__:
        known = _PEER_NORMS.get((base.__module__, base.__name__))
        if known is not None:
            return base, *known
    return None


@functools.cache  # by class and its forward: a forward assigned later is another key
def _class_norm(cls: type, forward) -> tuple[str | None, tuple | None]:
    """(the kind a module of class ``cls`` with ``forward`` computes, or None; its peer entry,
    :func:`_peer_norm`'s, None for torch's classes)."""
    peer = _peer_norm(cls)  # first: timm's and OpenCLIP's LayerNorms derive from nn.LayerNorm
    if peer is None:
        for torch_cls, kind in _TORCH_NORMS:
            if issubclass(cls, torch_cls):
                return (kind if forward is torch_cls.forward else None), None
        return None, None
    return (peer[1] if forward is peer[0].forward else None), peer


@functools.cache  # _zeta_base is set when a converted class is made (integrations/_base.py)
def _judged_class(cls: type) -> type:
    """The class a module of class ``cls`` is judged by: a norm converted for a hand-off by
    its peer's class. (A cached lookup: a missing class attribute costs an exception.)"""
    return getattr(cls, "_zeta_base", cls)


def _kind_and_peer(m: nn.Module) -> tuple[str | None, tuple | None]:
    """:func:`norm_kind` of ``m`` and its class's peer entry (the per-call path asks for both;
    a norm converted for a hand-off, integrations/_base.py, is judged by its peer's class)."""
    cls = _judged_class(type(m))
    kind, peer = _class_norm(cls, cls.forward)
    if kind is not None and "forward" in m.__dict__:  # its own forward (params.forward_of)
        return None, peer
    if kind is not None and peer is not None and getattr(m, "_fast_norm", False):
        return None, peer
    return kind, peer


def norm_kind(m: nn.Module | None) -> str | None:
    """The kind of norm ``m`` computes (LAYER_NORM, RMS_NORM), or None when it is no norm the
    op computes (any other module, a subclass that overrides forward or an instance given its
    own, a fast-norm option). A norm converted for a hand-off (integrations/_base.py) is
    judged by its peer's class."""
    return None if m is None else _kind_and_peer(m)[0]


def norm_problem(m: nn.Module, size: int) -> str | None:
    """Why ``m`` is not a norm the op computes over ``size`` values, or None. Checked per call
    by the modules (a norm's size can change in place)."""
    kind, peer = _kind_and_peer(m)
    if kind is None:
        return f"{type(m).__name__} is not a LayerNorm or RMSNorm the fused op computes"
    if (
        peer is not None
        and (peer[0].__module__, peer[0].__name__) in _WEIGHT_DECIDES_DTYPE
        and (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))
    ):
        return f"{type(m).__name__} under autocast (its weight's dtype decides its output's)"
    shape = getattr(m, "normalized_shape", None)
    if shape is None:  # the transformers RMSNorms: over their weight's size
        weight = param(m, "weight")
        shape = None if weight is None else tuple(weight.shape)
    if shape is not None and tuple(shape) != (size,):
        return f"{type(m).__name__} over {tuple(shape)}, not over the {size} values it gets"
    return None


def norm_value(m: nn.Module | None, dtype: torch.dtype) -> Norm | None:
    """The op's value of the norm module ``m`` (None: no norm) for an input of ``dtype``: its
    kind, its parameters read now, its epsilon (``nn.RMSNorm(eps=None)``'s as ``F.rms_norm``
    resolves it for ``dtype``: :func:`~zeta_fused.checks.norm_eps`)."""
    if m is None:
        return None
    kind = _kind_and_peer(m)[0]
    peer = _peer_norm(type(m))
    eps = norm_eps(getattr(m, "eps" if peer is None else peer[2]), dtype)
    bias = param(m, "bias") if "bias" in m._parameters else getattr(m, "bias", None)
    # tuple.__new__: Norm's own __new__ is a Python function, on the per-call path.
    return tuple.__new__(Norm, (kind, param(m, "weight"), bias, float(eps)))
