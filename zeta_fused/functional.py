"""Functional API (``patch_embed`` for inputs of any spatial rank, ``patch_embed_rows`` for
patches already cut), the dtype rule, and the one call of the fused op the modules share."""

from __future__ import annotations

import importlib
import sys

import torch
from torch import Tensor

from . import dispatch
from .checks import (
    NO_PARAMS,
    PatchSize,
    check_input,
    check_stem,
    check_weight,
    checked_params,
    pad_to_patch,
    patch_tuple,
)
from .kernels.contract import LAYER_NORM, NO_NORM
from .op import tuning
from .op.args import FwdArgs
from .op.reference import NO_STEM, Norm, Stem, patch_embed_reference, reference_call
from .op.register import patch_embed_fwd


def fused_dtypes(
    x: Tensor,
    weight: Tensor,
    post_norm: bool,
    stem_norm: bool = False,
    added: tuple[Tensor | None, ...] = (),
) -> tuple[torch.dtype, torch.dtype]:
    """(GEMM operand dtype, output dtype) giving the dtype the eager module returns.

    Outside autocast both are the input dtype. Under autocast the GEMM runs in the autocast
    dtype; a norm's output is fp32 on CUDA (CUDA autocast runs layer_norm in fp32) and its
    input's dtype on the CPU; tensors ``added`` to the tokens (a position table, prefix rows)
    promote the dtype as eager ``+`` and ``cat`` do.
    """
    device = "cuda" if x.is_cuda else x.device.type  # .device.type is slow to build
    if not torch.is_autocast_enabled(device):
        return weight.dtype, x.dtype
    low = torch.get_autocast_dtype(device)
    out = torch.float32 if (post_norm and device == "cuda") else low
    for t in added:
        if t is not None:
            out = torch.promote_types(out, t.dtype)
    return low, torch.float32 if (stem_norm and device == "cuda") else out


def op_inputs(
    x: Tensor,
    patch: tuple[int, ...],
    weight: Tensor,
    bias: Tensor | None,
    pre_norm: Norm,
    post_norm: Norm,
    eps: float,
    stem: Stem = NO_STEM,
) -> FwdArgs:
    """The fused op's inputs for a validated, padded call; dtypes as the eager module's."""
    pre_kind, (g1, b1) = (NO_NORM, NO_PARAMS) if pre_norm is None else (LAYER_NORM, pre_norm)
    post_kind, (g2, b2) = (NO_NORM, NO_PARAMS) if post_norm is None else (LAYER_NORM, post_norm)
    if stem is NO_STEM:
        compute, out = fused_dtypes(x, weight, post_norm is not None)
        pos = prefix = g3 = b3 = None
        stem_kind, stem_eps = NO_NORM, eps
    else:
        pos, prefix, stem_norm, stem_eps = stem
        compute, out = fused_dtypes(x, weight, post_norm is not None, stem_norm is not None,
                                    (pos, prefix))  # fmt: skip
        stem_kind, (g3, b3) = (NO_NORM, NO_PARAMS) if stem_norm is None else (LAYER_NORM, stem_norm)
    # tuple.__new__: FwdArgs' own __new__ is a Python function, on the per-call path.
    return tuple.__new__(FwdArgs, (x, weight, bias, pre_kind, g1, b1, post_kind, g2, b2, pos,
                                   prefix, stem_kind, g3, b3, tuple(patch), eps, stem_eps,
                                   compute, out))  # fmt: skip


def fused_patch_embed(args: FwdArgs) -> Tensor:
    """One call of the fused op (inputs from :func:`op_inputs`).

    With autograd off, outside torch.compile, on a plain tensor and with no dispatch mode
    active, the kernel is launched directly: the custom-op dispatcher adds host time to every
    call (docs/design.md, "Host path"), which small batches would feel. With tuning on
    (``zeta_fused.tuning``), calls of a kind the eager path ran faster run it instead.
    """
    if (
        not torch.compiler.is_compiling()
        and tuning.tuning()
        and tuning.path_for(args) == tuning.EAGER
    ):
        return reference_call(args)
    x = args.x
    if (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and type(x) is Tensor  # subclasses (FakeTensor, DTensor, ...) need the dispatcher
        and torch._C._len_torch_dispatch_stack() == 0  # so do dispatch modes
    ):
        launch = sys.modules.get("zeta_fused.op.launch") or importlib.import_module(
            ".op.launch", __package__
        )
        return launch.patch_embed_fwd(args)[0]
    return patch_embed_fwd(*args)[0]


def patch_embed(
    x: Tensor,
    patch_size: PatchSize,
    weight: Tensor,
    bias: Tensor | None = None,
    pre_norm: Norm = None,
    post_norm: Norm = None,
    eps: float = 1e-5,
    *,
    pos: Tensor | None = None,
    prefix: Tensor | None = None,
    stem_norm: Norm = None,
    stem_eps: float | None = None,
    dynamic_img_pad: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Patchify -> LayerNorm_K -> Linear -> LayerNorm_D (-> + pos -> prefix rows -> stem
    LayerNorm) as one fused op where possible.

    Args:
        x: input batch (B, C, *spatial): sequences (B, C, L), images (B, C, H, W), videos or
            volumes (B, C, T, H, W); floating point, any strides (a (B, T, C, H, W) tensor
            permuted to (B, C, T, H, W) is read in place).
        patch_size: an int (the same along every spatial dimension) or one size per dimension.
        weight: projection (D, K) with K = C * prod(patch) in (*patch, C) order (vit-pytorch's
            ``(p1 p2 c)``, ``(pf p1 p2 c)``, ``(p c)``), or a conv weight (D, C, *patch) used as
            it is (no copy; its gradient keeps that shape).
        bias: projection bias (D,) or None.
        pre_norm, post_norm: (weight, bias) of the LayerNorm over K / over D, either of them
            None as ``F.layer_norm`` takes them; None instead of the pair: no norm.
        eps: LayerNorm epsilon of pre_norm and post_norm.
        pos: position table (N, D) (or (1, N, D)) added to every image's N patch tokens, after
            post_norm. A table that also covers the prefix rows is split by the caller: its
            first rows are added to the prefix (``prefix = cls + pos[:1]``).
        prefix: (P, D) (or (1, P, D)) rows put before every image's patch tokens: class,
            distillation and register tokens, with their position rows already added.
        stem_norm: (weight, bias) of a LayerNorm over D of every output row, prefix rows
            included (timm's ``norm_pre``, CLIP's ``ln_pre``); None: no such norm.
        stem_eps: its epsilon (default: ``eps``).
        dynamic_img_pad: zero-pad the end of each spatial dimension to a multiple of the patch
            instead of raising.
        backend: "auto" | "triton" | "eager" (see the README).

    Returns:
        (B, P + N, D) tokens: the P prefix rows, then N = prod(spatial / patch) patch tokens
        in grid order (last dimension fastest).
    """
    patch = patch_tuple(patch_size, x.ndim - 2 if isinstance(patch_size, int) else len(patch_size))
    check_input(x, None, patch, dynamic_img_pad)
    check_weight(weight, x.shape[1], patch)
    bias, pre_norm, post_norm = checked_params(x, weight, weight.shape, bias, pre_norm, post_norm)
    if dynamic_img_pad:
        x = pad_to_patch(x, patch)
    stem = NO_STEM
    if pos is not None or prefix is not None or stem_norm is not None:
        stem = check_stem(x, patch, weight.shape[0], pos, prefix, stem_norm,
                          eps if stem_eps is None else stem_eps)  # fmt: skip
    if dispatch.use_fused(dispatch.check_backend(backend), x):
        return fused_patch_embed(op_inputs(x, patch, weight, bias, pre_norm, post_norm, eps, stem))
    return patch_embed_reference(x, patch, weight, bias, pre_norm, post_norm, eps, stem)


def patch_embed_rows(
    rows: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pre_norm: Norm = None,
    post_norm: Norm = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    """The patch embedding of patches already cut: rows (L, K) -> tokens (L, D).

    Qwen2-VL / Qwen2.5-VL / Qwen3-VL image processors (and LTX, CogVideoX 1.5, Cosmos) hand
    their vision towers such rows, K = C * pt * ph * pw values each, and view them as
    (L, C, pt, ph, pw) for a Conv3d: a conv weight (D, C, *patch) reads each row in that
    (c, *patch) order, in place; a Linear weight (D, K) reads it in its own order.

    Args:
        rows: (L, K), floating point.
        weight: (D, K), or a conv weight (D, C, *patch) with C * prod(patch) = K.
        bias, pre_norm, post_norm, eps, backend: as :func:`patch_embed`.

    Returns:
        (L, D) tokens.
    """
    if rows.ndim != 2:
        raise ValueError(f"expected rows of shape (L, K), got {tuple(rows.shape)}")
    width = weight.shape[1] if weight.ndim == 2 else weight[0].numel()
    if rows.shape[1] != width:
        what = "" if weight.ndim == 2 else f" (C * prod(patch) for its {tuple(weight.shape[1:])})"
        raise ValueError(
            f"rows have {rows.shape[1]} values each but the weight takes {width}{what}"
        )
    # One patch per "input": a conv weight sees (L, C, *patch), a Linear one (L, K, 1).
    cut = weight.shape[1:] if weight.ndim > 2 else (width, 1)
    x = rows.unflatten(1, cut) if rows.stride(1) == 1 else rows.reshape(-1, *cut)
    y = patch_embed(x, cut[1:], weight, bias, pre_norm, post_norm, eps, backend=backend)
    return y.view(rows.shape[0], -1)
