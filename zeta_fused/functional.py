"""Functional API, input validation and the dtype rule shared by the module and ``patch_embed``."""

from __future__ import annotations

import importlib
import math
import operator
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .op_args import LAYER_NORM, NO_NORM, FwdArgs
from .ops import patch_embed_fwd
from .reference import Norm, patch_embed_reference

PatchSize = int | tuple[int, int]


def as_int(value, what: str) -> int:
    """An integer argument as a Python int: any integral type (numpy's included), not floats."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None


def pair(patch_size: PatchSize) -> tuple[int, int]:
    if isinstance(patch_size, (tuple, list)):
        if len(patch_size) != 2:
            raise ValueError(f"patch_size must be an int or (ph, pw), got {patch_size!r}")
        ph, pw = (as_int(p, "patch_size") for p in patch_size)
    else:
        ph = pw = as_int(patch_size, "patch_size")
    if ph < 1 or pw < 1:
        raise ValueError(f"patch_size must be positive, got {(ph, pw)}")
    return ph, pw


def resolve_patch_size(seq_len: int | None, patch_size: PatchSize | None) -> tuple[int, int]:
    """The (ph, pw) patch from zeta's ``seq_len`` (pixels per patch) and/or ``patch_size``."""
    if patch_size is not None:
        ph, pw = pair(patch_size)
        if seq_len is not None and as_int(seq_len, "seq_len") != ph * pw:
            raise ValueError(
                f"seq_len={seq_len} is inconsistent with patch_size={(ph, pw)}: a patch of "
                f"{ph}x{pw} holds {ph * pw} pixels"
            )
        return ph, pw
    if seq_len is None:
        raise ValueError("give seq_len (pixels per patch) or patch_size")
    seq_len = as_int(seq_len, "seq_len")
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
    shape = x.shape
    if len(shape) != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got {tuple(shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point image, got {x.dtype}: convert and normalise images first"
        )
    _, chans, height, width = shape
    if dim_in is not None and chans != dim_in:
        raise ValueError(f"expected {dim_in} input channels (dim_in), got C={chans}")
    ph, pw = patch
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


def checked_params(x: Tensor, weight: Tensor, weight_shape: tuple[int, ...],
                   bias: Tensor | None, pre_norm: Norm, post_norm: Norm,
                   shapes_known: bool = False) -> tuple[Tensor | None, Norm, Norm]:  # fmt: skip
    """Every parameter of a fused call checked once, on the per-call path: the weight of
    ``weight_shape``, the bias (D,) and the norms' (weight, bias) of their sizes (the kernels
    would read past a short one), contiguous, all on the image's device and of its dtype
    (unless autocast decides). ``shapes_known``: these very tensors passed the shape checks
    before (a module's parameters): only devices and dtypes are checked. Returns the vectors,
    a strided one as a contiguous copy (the kernels read them as runs). Anything unusual takes
    the slow path, which names what is wrong."""
    dim = weight_shape[0]
    device, dtype = x.device, x.dtype
    g1, b1 = _NO_PARAMS if pre_norm is None else _norm(pre_norm, 0, "pre_norm", False)
    g2, b2 = _NO_PARAMS if post_norm is None else _norm(post_norm, 0, "post_norm", False)
    if shapes_known:
        fine = True
        for t in (weight, bias, g1, b1, g2, b2):
            if t is not None and not (t.device == device and t.dtype is dtype):
                fine = False
                break
    else:
        k_vector = (math.prod(weight_shape[1:]),)
        d_vector = (dim,)
        fine = weight.shape == weight_shape and weight.device == device and weight.dtype is dtype
        for t, shape in ((bias, d_vector), (g1, k_vector), (b1, k_vector), (g2, d_vector),
                         (b2, d_vector)):  # fmt: skip
            if t is not None:
                fine = (
                    fine
                    and t.shape == shape
                    and t.device == device
                    and t.dtype is dtype
                    and t.is_contiguous()
                )
    if not fine:  # the slow path: named errors, autocast's mixed dtypes, contiguous copies
        if weight.shape != weight_shape:
            raise ValueError(f"weight must have shape {weight_shape}, got {tuple(weight.shape)}")
        patch_dim = math.prod(weight_shape[1:])
        bias, pre_norm, post_norm = check_vectors(bias, pre_norm, post_norm, patch_dim, dim)
        check_params(x, [weight, bias, *(pre_norm or ()), *(post_norm or ())])
    return bias, pre_norm, post_norm


def check_vectors(bias: Tensor | None, pre_norm: Norm, post_norm: Norm, patch_dim: int,
                  dim: int) -> tuple[Tensor | None, Norm, Norm]:  # fmt: skip
    """The bias (D,) and the norms' (weight, bias) of the sizes they need, a clear error
    otherwise (the kernels would read past a short one); a strided vector comes back
    contiguous (the kernels read them as runs)."""
    return (
        _vector(bias, dim, "bias"),
        _norm(pre_norm, patch_dim, "pre_norm"),
        _norm(post_norm, dim, "post_norm"),
    )


def _norm(norm, size: int, which: str, check: bool = True) -> Norm:
    """A norm's (weight, bias), checked (``check``) or only unpacked; None for no norm."""
    if norm is None:
        return None
    if not isinstance(norm, (tuple, list)) or len(norm) != 2:
        raise TypeError(
            f"{which} must be a LayerNorm's (weight, bias), either of them None, or None for "
            f"no norm; got {type(norm).__name__}"
        )
    if not check:
        return norm
    return _vector(norm[0], size, f"{which} weight"), _vector(norm[1], size, f"{which} bias")


def _vector(t: Tensor | None, size: int, name: str) -> Tensor | None:
    if t is None:
        return None
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    return t if t.is_contiguous() else t.contiguous()


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
    device = "cuda" if x.is_cuda else x.device.type  # .device.type is slow to build
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
    # tuple.__new__: FwdArgs' own __new__ is a Python function, on the per-call path.
    return tuple.__new__(FwdArgs, (x, weight, bias, pre_kind, g1, b1, post_kind, g2, b2,
                                   tuple(patch), eps, compute, out))  # fmt: skip


_NO_PARAMS = (None, None)


def fused_patch_embed(args: FwdArgs) -> Tensor:
    """One call of the fused op (inputs from :func:`op_inputs`).

    With autograd off, outside torch.compile, on a plain tensor and with no dispatch mode
    active, the kernel is launched directly: the custom-op dispatcher adds host time to every
    call (docs/design.md, "Host path"), which small batches would feel.
    """
    x = args.x
    if (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and type(x) is Tensor  # subclasses (FakeTensor, DTensor, ...) need the dispatcher
        and torch._C._len_torch_dispatch_stack() == 0  # so do dispatch modes
    ):
        launch = sys.modules.get("zeta_fused.launch") or importlib.import_module(
            ".launch", __package__
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
        pre_norm, post_norm: (weight, bias) of the LayerNorm over K / over D, either of them
            None as ``F.layer_norm`` takes them; None instead of the pair: no norm.
        eps: LayerNorm epsilon (both norms).
        dynamic_img_pad: zero-pad bottom/right to a multiple of the patch instead of raising.
        backend: "auto" | "triton" | "eager" (see the README).

    Returns:
        (B, N, D) tokens, N = (H / ph) * (W / pw).
    """
    patch = pair(patch_size)
    check_input(x, None, patch, dynamic_img_pad)
    check_weight(weight, x.shape[1], patch)
    bias, pre_norm, post_norm = checked_params(x, weight, weight.shape, bias, pre_norm, post_norm)
    if dynamic_img_pad:
        x = pad_to_patch(x, patch)
    if dispatch.use_fused(dispatch.check_backend(backend), x):
        return fused_patch_embed(op_inputs(x, patch, weight, bias, pre_norm, post_norm, eps))
    return patch_embed_reference(x, patch, weight, bias, pre_norm, post_norm, eps)
