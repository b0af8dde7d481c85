"""Functional API, input validation and the dtype rule shared by the module and ``patch_embed``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .op_args import LAYER_NORM, NO_NORM, FwdArgs
from .ops import patch_embed_fwd
from .reference import Norm, patch_embed_reference

PatchSize = int | tuple[int, int]


def pair(patch_size: PatchSize) -> tuple[int, int]:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"patch_size must be positive, got {(ph, pw)}")
    return int(ph), int(pw)


def resolve_patch_size(seq_len: int | None, patch_size: PatchSize | None) -> tuple[int, int]:
    """The (ph, pw) patch from zeta's ``seq_len`` (pixels per patch) and/or ``patch_size``."""
    if patch_size is not None:
        ph, pw = pair(patch_size)
        if seq_len is not None and seq_len != ph * pw:
            raise ValueError(
                f"seq_len={seq_len} is inconsistent with patch_size={(ph, pw)}: a patch of "
                f"{ph}x{pw} holds {ph * pw} pixels"
            )
        return ph, pw
    if seq_len is None:
        raise ValueError("give seq_len (pixels per patch) or patch_size")
    side = math.isqrt(seq_len) if seq_len > 0 else 0
    if seq_len < 1 or side * side != seq_len:
        raise ValueError(
            f"seq_len={seq_len} is not a perfect square, so it does not give a square patch; "
            f"pass patch_size=(ph, pw) with ph * pw == seq_len"
        )
    return side, side


def check_input(
    x: Tensor, dim_in: int | None, patch: tuple[int, int], dynamic_img_pad: bool
) -> None:
    """Raise the documented error for a bad image batch (see the README's error table)."""
    if x.ndim != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point image, got {x.dtype}: convert and normalise images first"
        )
    if dim_in is not None and x.shape[1] != dim_in:
        raise ValueError(f"expected {dim_in} input channels (dim_in), got C={x.shape[1]}")
    ph, pw = patch
    height, width = x.shape[-2:]
    if not dynamic_img_pad and (height % ph or width % pw):
        raise ValueError(
            f"image size H={height}, W={width} is not a multiple of the patch {ph}x{pw}; "
            f"resize, crop or use dynamic_img_pad=True"
        )


def check_weight(weight: Tensor, chans: int, patch: tuple[int, int]) -> None:
    """A Linear weight (D, C*ph*pw) in (ph pw C) order, or a Conv2d weight (D, C, ph, pw)."""
    ph, pw = patch
    if weight.ndim == 2 and weight.shape[1] == chans * ph * pw:
        return
    if weight.ndim == 4 and tuple(weight.shape[1:]) == (chans, ph, pw):
        return
    raise ValueError(
        f"weight must be (D, C*ph*pw) = (D, {chans * ph * pw}) or a Conv2d weight "
        f"(D, {chans}, {ph}, {pw}), got {tuple(weight.shape)}"
    )


def check_params(x: Tensor, params: list[Tensor | None]) -> None:
    """Same device for image and parameters; same dtype unless autocast decides it."""
    device, dtype = x.device, x.dtype  # hoisted: each .device builds a new object
    for p in params:
        if p is None:
            continue
        if p.device != device:
            raise RuntimeError(
                f"input is on {device} but the parameters are on {p.device}: move one of them"
            )
        if p.dtype != dtype and not torch.is_autocast_enabled(device.type):
            raise RuntimeError(
                f"input dtype {x.dtype} differs from parameter dtype {p.dtype}: cast one of them "
                f"or run under torch.autocast"
            )


def pad_to_patch(x: Tensor, patch: tuple[int, int]) -> Tensor:
    """Zero-pad bottom/right to a multiple of the patch (timm's ``dynamic_img_pad``)."""
    ph, pw = patch
    pad_h, pad_w = -x.shape[-2] % ph, -x.shape[-1] % pw
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def fused_dtypes(x: Tensor, weight: Tensor, post_norm: bool) -> tuple[torch.dtype, torch.dtype]:
    """(GEMM operand dtype, output dtype) giving the dtype the eager module returns.

    Outside autocast both are the input dtype. Under autocast the GEMM runs in the autocast
    dtype; the output is fp32 on CUDA with a post-norm (CUDA autocast runs layer_norm in fp32)
    and the autocast dtype otherwise (CPU autocast keeps layer_norm in the input dtype).
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return weight.dtype, x.dtype
    low = torch.get_autocast_dtype(device)
    return low, torch.float32 if (post_norm and device == "cuda") else low


def op_inputs(
    x: Tensor,
    patch: tuple[int, ...],
    weight: Tensor,
    bias: Tensor | None,
    pre_norm: Norm,
    post_norm: Norm,
    eps: float,
) -> FwdArgs:
    """The fused op's inputs for a validated, padded call; dtypes as the eager module's."""
    compute, out = fused_dtypes(x, weight, post_norm is not None)
    pre_kind, (g1, b1) = (NO_NORM, _NO_PARAMS) if pre_norm is None else (LAYER_NORM, pre_norm)
    post_kind, (g2, b2) = (NO_NORM, _NO_PARAMS) if post_norm is None else (LAYER_NORM, post_norm)
    return FwdArgs(x, weight, bias, pre_kind, g1, b1, post_kind, g2, b2, tuple(patch), eps, compute,
                   out)  # fmt: skip


_NO_PARAMS = (None, None)


def fused_patch_embed(args: FwdArgs) -> Tensor:
    """One call of the fused op (inputs from :func:`op_inputs`).

    With autograd off and outside torch.compile the kernel is launched directly: the custom-op
    dispatcher adds host time to every call (docs/design.md, "Host path"), which small batches
    would feel.
    """
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        from .launch import patch_embed_fwd as launch

        return launch(args)[0]
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
    dynamic_img_pad: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Patchify -> LayerNorm_K -> Linear -> LayerNorm_D as one fused op where possible.

    Args:
        x: image batch (B, C, H, W), floating point, any strides.
        patch_size: int or (ph, pw).
        weight: projection (D, K) with K = C * ph * pw in (ph, pw, C) order, or a Conv2d
            weight (D, C, ph, pw) used as it is (no copy; its gradient keeps that shape).
        bias: projection bias (D,) or None.
        pre_norm, post_norm: (weight, bias) of the LayerNorm over K / over D, or None.
        eps: LayerNorm epsilon (both norms).
        dynamic_img_pad: zero-pad bottom/right to a multiple of the patch instead of raising.
        backend: "auto" | "triton" | "eager" (see the README).

    Returns:
        (B, N, D) tokens, N = (H / ph) * (W / pw).
    """
    patch = pair(patch_size)
    check_input(x, None, patch, dynamic_img_pad)
    check_weight(weight, x.shape[1], patch)
    norms = [t for n in (pre_norm, post_norm) if n is not None for t in n]
    check_params(x, [weight, bias, *norms])
    if dynamic_img_pad:
        x = pad_to_patch(x, patch)
    if dispatch.use_fused(dispatch.check_backend(backend), x):
        return fused_patch_embed(op_inputs(x, patch, weight, bias, pre_norm, post_norm, eps))
    return patch_embed_reference(x, patch, weight, bias, pre_norm, post_norm, eps)
