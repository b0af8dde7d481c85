"""Validation shared by the modules, the converted peers and the functional API: integer
arguments, patch sizes, the input batch, the weight and every parameter of a fused call, and
the padding to a multiple of the patch (docs/guarantees.md, "Errors")."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.nn import Parameter

from .kernels.contract import LAYER_NORM, RMS_NORM
from .op.args import TENSOR_AT, FwdArgs, Norm, Stem

PatchSize = int | tuple[int, ...]
# The (weight, bias) of no norm, unpacked on the per-call path.
NO_PARAMS = (None, None)


def as_int(value, what: str) -> int:
    """An integer argument as a Python int: any integral type (numpy's included), not floats."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None


def patch_tuple(patch_size, rank: int) -> tuple[int, ...]:
    """A patch of ``rank`` spatial dimensions from an int (the same size along each) or a
    sequence of ``rank`` ints."""
    if isinstance(patch_size, (tuple, list)):
        if len(patch_size) != rank:
            raise ValueError(
                f"patch_size {tuple(patch_size)!r} has {len(patch_size)} dimensions, the input "
                f"{rank} spatial ones"
            )
        patch = tuple(as_int(p, "patch_size") for p in patch_size)
    else:
        patch = (as_int(patch_size, "patch_size"),) * rank
    if min(patch, default=1) < 1:
        raise ValueError(f"patch_size must be positive, got {patch}")
    return patch


def pair(patch_size) -> tuple[int, int]:
    return patch_tuple(patch_size, 2)


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


# The layout each spatial rank's inputs are documented with.
INPUT_SHAPES = {1: "a sequence batch of shape (B, C, L)", 2: "an image batch of shape (B, C, H, W)",
                3: "a video or volume batch of shape (B, C, T, H, W)"}  # fmt: skip


def check_input(x: Tensor, dim_in: int | None, patch: tuple[int, ...], pad: bool) -> None:
    """Raise the documented error for a bad input batch (docs/guarantees.md, "Errors"); its
    rank must be the patch's plus two. ``pad``: sizes need not be multiples of the patch."""
    shape, rank = x.shape, len(patch)
    if len(shape) != rank + 2:
        what = INPUT_SHAPES.get(rank, f"an input of shape (B, C, {rank} spatial dims)")
        raise ValueError(f"expected {what} for a {rank}-D patch, got {tuple(shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point input, got {x.dtype}: convert and normalise it first"
        )
    if dim_in is not None and shape[1] != dim_in:
        raise ValueError(f"expected {dim_in} input channels (dim_in), got C={shape[1]}")
    if pad:
        return
    if rank == 2:  # images, spelled out: the per-call path of the image modules
        if shape[2] % patch[0] or shape[3] % patch[1]:
            raise ValueError(
                f"image size H={shape[2]}, W={shape[3]} is not a multiple of the patch "
                f"{patch[0]}x{patch[1]}; resize, crop or use dynamic_img_pad=True"
            )
    elif any(s % p for s, p in zip(shape[2:], patch, strict=True)):
        raise ValueError(
            f"input size {tuple(shape[2:])} is not a multiple of the patch {patch}; crop it or "
            f"pad it (dynamic_img_pad=True)"
        )


def check_weight(weight: Tensor, chans: int, patch: tuple[int, ...]) -> None:
    """A Linear weight (D, C * prod(patch)) in (*patch, C) order, or a conv weight
    (D, C, *patch)."""
    k = chans * math.prod(patch)
    if weight.ndim == 2 and weight.shape[1] == k:
        return
    if weight.ndim == len(patch) + 2 and tuple(weight.shape[1:]) == (chans, *patch):
        return
    raise ValueError(
        f"weight must be (D, C * prod(patch)) = (D, {k}) or a conv weight (D, {chans}, "
        f"{', '.join(map(str, patch))}), got {tuple(weight.shape)}"
    )


def norm_arg(norm, eps: float, which: str) -> Norm | None:
    """A norm argument of the functional API as a value: a :class:`~zeta_fused.Norm`, a
    LayerNorm's ``(weight, bias)`` pair (either None) with the call's ``eps``, or None."""
    if norm is None or isinstance(norm, Norm):
        return norm
    if isinstance(norm, (tuple, list)) and len(norm) == 2:
        return Norm(LAYER_NORM, norm[0], norm[1], eps)
    raise TypeError(
        f"{which} must be a zeta_fused.Norm, a LayerNorm's (weight, bias) with either of them "
        f"None, or None for no norm; got {type(norm).__name__}"
    )


def norm_eps(eps: float | None, dtype: torch.dtype) -> float:
    """A norm's epsilon for an input of ``dtype``. None (``nn.RMSNorm(eps=None)``, an RMSNorm
    Norm's own) is what ``F.rms_norm`` uses: the machine epsilon of the type it accumulates
    in, fp64's for fp64 inputs and fp32's for every other one (bf16, fp16, fp32). Autocast
    does not change it: CUDA autocast runs rms_norm in fp32 and leaves fp64 alone, the CPU's
    does not cast it."""
    if eps is not None:
        return eps
    return _FP64_EPS if dtype is torch.float64 else _FP32_EPS


_FP32_EPS, _FP64_EPS = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def checked_params(x: Tensor, weight: Tensor, weight_shape: tuple[int, ...],
                   bias: Tensor | None, pre_norm: Norm | None, post_norm: Norm | None,
                   ) -> tuple[Tensor | None, Norm | None, Norm | None]:  # fmt: skip
    """Every parameter of a fused call checked, on the per-call path: the weight of
    ``weight_shape``, the bias (D,) and the norms' weight and bias of their sizes (the kernels
    would read past a short one), contiguous, all on the image's device and of its dtype
    (unless autocast decides). Returns the vectors, a strided one as a contiguous copy (the
    kernels read them as runs). Anything unusual takes the slow path, which names what is
    wrong."""
    dim = weight_shape[0]
    device, dtype = x.device, x.dtype
    g1, b1 = NO_PARAMS if pre_norm is None else pre_norm[1:3]
    g2, b2 = NO_PARAMS if post_norm is None else post_norm[1:3]
    k_vector = (math.prod(weight_shape[1:]),)
    d_vector = (dim,)
    fine = (
        weight.shape == weight_shape
        and weight.device == device
        and weight.dtype is dtype
        and _usable(pre_norm)
        and _usable(post_norm)
    )
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
        bias, pre_norm, post_norm = check_vectors(bias, pre_norm, post_norm, patch_dim, dim,
                                                  dtype)  # fmt: skip
        check_params(x, [weight, bias, *norm_tensors(pre_norm), *norm_tensors(post_norm)])
    return bias, pre_norm, post_norm


def _usable(norm: Norm | None) -> bool:
    """No norm, or one of a known kind with an epsilon the op takes as it is (a default one,
    None, and a bad one go to the slow path: :func:`_norm` resolves or rejects them)."""
    return norm is None or (
        norm.kind in (LAYER_NORM, RMS_NORM) and norm.eps is not None and norm.eps >= 0
    )


def norm_tensors(norm: Norm | None) -> tuple[Tensor | None, ...]:
    """A norm's weight and bias (either None); nothing for no norm."""
    return () if norm is None else (norm.weight, norm.bias)


def check_vectors(bias: Tensor | None, pre_norm: Norm | None, post_norm: Norm | None,
                  patch_dim: int, dim: int, dtype: torch.dtype,
                  ) -> tuple[Tensor | None, Norm | None, Norm | None]:  # fmt: skip
    """The bias (D,) and the norms (:func:`_norm`, for an input of ``dtype``) of the sizes they
    need, a clear error otherwise (the kernels would read past a short one); a strided vector
    comes back contiguous (the kernels read them as runs)."""
    return (
        _vector(bias, dim, "bias"),
        _norm(pre_norm, patch_dim, "pre_norm", dtype),
        _norm(post_norm, dim, "post_norm", dtype),
    )


def _norm(norm: Norm | None, size: int, which: str, dtype: torch.dtype) -> Norm | None:
    """A norm value checked: its kind, its epsilon (an RMSNorm's default, None, resolved for an
    input of ``dtype``: :func:`norm_eps`), its vectors of ``size``."""
    if norm is None:
        return None
    if not isinstance(norm, Norm):
        raise TypeError(f"{which} must be a zeta_fused.Norm or None, got {type(norm).__name__}")
    if norm.kind not in (LAYER_NORM, RMS_NORM):
        raise ValueError(f"{which} kind must be {LAYER_NORM!r} or {RMS_NORM!r}, got {norm.kind!r}")
    eps = norm.eps if norm.kind == LAYER_NORM else norm_eps(norm.eps, dtype)
    if eps is None or not eps >= 0:  # None: a LayerNorm has no default
        raise ValueError(f"{which} eps must be a non-negative number, got {norm.eps!r}")
    weight = _vector(norm.weight, size, f"{which} weight")
    bias = _vector(norm.bias, size, f"{which} bias")
    return norm._replace(weight=weight, bias=bias, eps=float(eps))


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


def pad_to_patch(x: Tensor, patch: tuple[int, ...]) -> Tensor:
    """Zero-pad the end of every spatial dimension to a multiple of the patch (timm's
    ``dynamic_img_pad``: bottom/right for images)."""
    pads = [-s % p for s, p in zip(x.shape[2:], patch, strict=True)]
    if not any(pads):
        return x
    return F.pad(x, [n for pad in reversed(pads) for n in (0, pad)])


def check_stem(x: Tensor, patch: tuple[int, ...], dim: int, stem: Stem,
               rows: int | None = None, values: bool = True) -> Stem:  # fmt: skip
    """The position table (N, D) ((T, D) with a table index), the prefix rows (P, D) (each may
    have a leading 1), the table index (B, rows) and the stem norm's (D,) vectors checked, on
    the image's device and of its dtype (unless autocast decides); the table comes back
    contiguous (the kernels read it as rows). ``rows``: patch tokens per image (N by
    default). ``values=False``: a table index a model made itself, as :func:`check_keep`."""
    tokens = math.prod([s // p for s, p in zip(x.shape[2:], patch, strict=True)])
    index = stem.pos_index
    if index is None:
        pos = _rows(stem.pos, tokens, dim, "pos", f"the {tokens} patch tokens")
    else:
        pos = _rows(stem.pos, None, dim, "pos", "a table index")
        if pos is None:
            raise ValueError("pos_index needs a position table pos")
        index = _index(index, "pos_index", x, tokens if rows is None else rows, pos.shape[0],
                       f"the {pos.shape[0]} rows of pos", values)  # fmt: skip
    prefix = _rows(stem.prefix, None, dim, "prefix", "the prefix rows")
    stem_norm = _norm(stem.norm, dim, "stem_norm", x.dtype)
    check_params(x, [pos, prefix, *norm_tensors(stem_norm)])
    return Stem(pos, prefix, stem_norm, index)


def _rows(t: Tensor | None, rows: int | None, dim: int, name: str, what: str) -> Tensor | None:
    """A (rows, dim) table, given as such or with a leading 1; rows None: any number."""
    if t is None:
        return None
    # (squeeze, not [0]: a view whose backward is one too, where a select's fills a zero tensor)
    table = t.squeeze(0) if t.ndim == 3 and t.shape[0] == 1 else t
    if table.ndim != 2 or table.shape[1] != dim or (rows is not None and table.shape[0] != rows):
        want = f"({'P' if rows is None else rows}, {dim})"
        raise ValueError(f"{name} must have shape {want} for {what}, got {tuple(t.shape)}")
    return table if table.is_contiguous() else table.contiguous()


def check_keep(keep, x: Tensor, patch: tuple[int, ...], values: bool = True) -> Tensor:
    """A keep index: (B, L) int64 grid positions in [0, N) on the image's device, the same L
    for every image; returned contiguous. ``values=False``: an index a model made itself (an
    argsort, a topk), whose values are not checked (no host sync on its per-call path)."""
    tokens = math.prod([s // p for s, p in zip(x.shape[2:], patch, strict=True)])
    return _index(keep, "keep", x, None, tokens, f"the {tokens} patches per image", values)


def _index(index, name: str, x: Tensor, rows: int | None, bound: int, what: str,
           values: bool = True) -> Tensor:  # fmt: skip
    """A (B, rows) int64 index (rows None: any L) with values in [0, bound), on the image's
    device; returned contiguous. Out-of-range values raise here, before anything is computed
    (a host sync; under torch.compile or CUDA-graph capture, which cannot sync, a device-side
    assert instead). An index on the meta device or a FakeTensor (shape inference, memory
    planning) has no values: only its shape is checked."""
    batch = x.shape[0]
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be a (B, L) int64 tensor of indices, got {type(index)}")
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must hold int64 indices, got {index.dtype}")
    want = "L" if rows is None else rows
    if index.ndim != 2 or index.shape[0] != batch or (rows is not None and index.shape[1] != rows):
        raise ValueError(
            f"{name} must have shape (B, L) = ({batch}, {want}) for a batch of {batch}, got "
            f"{tuple(index.shape)}"
        )
    if index.device != x.device:
        raise RuntimeError(f"input is on {x.device} but {name} is on {index.device}: move one")
    if values:
        in_range = ((index >= 0) & (index < bound)).all()
        message = f"{name} holds indices outside [0, {bound}) for {what}"
        # is_compiling first: dynamo can trace neither is_current_stream_capturing (it returns
        # a bool) nor is_fake
        if torch.compiler.is_compiling() or (
            x.is_cuda and torch.cuda.is_current_stream_capturing()
        ):
            torch._assert_async(in_range, message)
        elif index.numel() and not (index.is_meta or is_fake(index)) and not in_range:
            raise ValueError(message)  # (a meta or fake index holds no values to read)
    return index if index.is_contiguous() else index.contiguous()


def wrapped_operand(args: FwdArgs) -> bool:
    """Some tensor of the call is a wrapper tensor subclass (it has ``__tensor_flatten__``:
    DTensor, torchao's quantized and float8 tensors): it holds no buffer the kernels can read,
    and the op has no rule for it. The caller then runs the module's own code, which the
    subclass implements. (FakeTensor and FunctionalTensor, which torch.compile and
    torch.export trace with, are no wrappers: they go to the op.)"""
    for i in TENSOR_AT:
        t = args[i]
        if t is not None:
            cls = type(t)
            if cls is not Parameter and cls is not Tensor and hasattr(cls, "__tensor_flatten__"):
                return True
    return False
