"""Functional API (``patch_embed`` for inputs of any spatial rank, ``patch_embed_rows`` for
patches already cut), the dtype rule, and :func:`fused_call`, the one path by which every module
and converted peer reaches the fused op."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import dispatch
from .checks import (
    PatchSize,
    check_input,
    check_keep,
    check_stem,
    check_weight,
    checked_params,
    norm_arg,
    pad_to_patch,
    patch_tuple,
    wrapped_operand,
)
from .op import tuning
from .op.args import NO_STEM, FwdArgs, Norm, Stem, fwd_args
from .op.reference import patch_embed_reference, reference_call
from .op.register import dispatcher_free, fwd_impl, patch_embed_autograd, patch_embed_fwd


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
    pre_norm: Norm | None,
    post_norm: Norm | None,
    stem: Stem = NO_STEM,
    keep: Tensor | None = None,
) -> FwdArgs:
    """The fused op's inputs for a validated, padded call; dtypes as the eager module's."""
    if stem is NO_STEM:
        compute, out = fused_dtypes(x, weight, post_norm is not None)
    else:
        compute, out = fused_dtypes(x, weight, post_norm is not None, stem.norm is not None,
                                    (stem.pos, stem.prefix))  # fmt: skip
    return fwd_args(x, weight, bias, pre_norm, post_norm, stem, keep, tuple(patch), compute, out)


def fused_call(x: Tensor, patch: tuple[int, ...], weight: Tensor, weight_shape: tuple[int, ...],
               bias: Tensor | None, pre_norm: Norm | None = None, post_norm: Norm | None = None,
               stem: Stem = NO_STEM, keep: Tensor | None = None) -> Tensor | None:  # fmt: skip
    """The one path of every module and converted peer to the fused op, once it has decided
    that the call runs fused (:func:`~zeta_fused.dispatch.use_fused`, no hooks) and read its
    parameters: every parameter checked (:func:`~zeta_fused.checks.checked_params`), the stem
    checked, the op called. ``x`` is validated (and padded or cropped) already. None: an
    operand is a wrapper tensor subclass (:func:`~zeta_fused.checks.wrapped_operand`), and the
    caller runs its own code."""
    bias, pre_norm, post_norm = checked_params(x, weight, weight_shape, bias, pre_norm, post_norm)
    # Indices here are made by the model itself (an argsort, a topk, an arange): their values
    # are not read back (no host sync per call).
    if keep is not None:
        keep = check_keep(keep, x, patch, values=False)
    if stem is not NO_STEM:
        rows = None if keep is None else keep.shape[1]
        stem = check_stem(x, patch, weight_shape[0], stem, rows, values=False)
    args = op_inputs(x, patch, weight, bias, pre_norm, post_norm, stem, keep)
    return None if wrapped_operand(args) else fused_patch_embed(args)


def fused_patch_embed(args: FwdArgs) -> Tensor:
    """One call of the fused op (inputs from :func:`op_inputs`).

    An eager call (:func:`~zeta_fused.op.register.dispatcher_free`) runs the op's
    implementation without the dispatcher, which adds host time to every call that small
    batches feel (docs/design.md, "Host path"): directly when no gradient is recorded, else
    through the op's autograd as a plain ``autograd.Function``. torch.compile, torch.export,
    dispatch modes and torch.func see the custom op. With tuning on (``zeta_fused.tuning``),
    calls of a kind the eager path ran faster run it instead.
    """
    if torch.compiler.is_compiling():
        return patch_embed_fwd(*args)[0]
    if tuning.tuning() and tuning.path_for(args) == tuning.EAGER:
        return reference_call(args)
    if dispatcher_free(args.x):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return patch_embed_autograd(*args)[0]
        return fwd_impl(args, with_stats=False)[0]  # no backward reads the statistics
    return patch_embed_fwd(*args)[0]


def patch_embed(
    x: Tensor,
    patch_size: PatchSize,
    weight: Tensor,
    bias: Tensor | None = None,
    pre_norm: Norm | tuple | None = None,
    post_norm: Norm | tuple | None = None,
    eps: float = 1e-5,
    *,
    pos: Tensor | None = None,
    prefix: Tensor | None = None,
    stem_norm: Norm | tuple | None = None,
    stem_eps: float | None = None,
    keep: Tensor | None = None,
    pos_index: Tensor | None = None,
    dynamic_img_pad: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Patchify -> norm_K -> Linear -> norm_D (-> + pos -> prefix rows -> stem norm) as one
    fused op where possible; each norm a LayerNorm or an RMSNorm.

    Args:
        x: input batch (B, C, *spatial): sequences (B, C, L), images (B, C, H, W), videos or
            volumes (B, C, T, H, W); floating point, any strides (a (B, T, C, H, W) tensor
            permuted to (B, C, T, H, W) is read in place).
        patch_size: an integer (any integral type, numpy's included: the same along every
            spatial dimension) or one size per dimension.
        weight: projection (D, K) with K = C * prod(patch) in (*patch, C) order (vit-pytorch's
            ``(p1 p2 c)``, ``(pf p1 p2 c)``, ``(p c)``), or a conv weight (D, C, *patch) used as
            it is (no copy; its gradient keeps that shape).
        bias: projection bias (D,) or None.
        pre_norm, post_norm: the norm over K / over D: a :class:`~zeta_fused.Norm` (kind
            ``"layer_norm"`` or ``"rms_norm"``, weight, bias, eps; weight and bias either None),
            or a LayerNorm's ``(weight, bias)`` pair (either None, as ``F.layer_norm`` takes
            them) with ``eps``; None: no norm.
        eps: the epsilon of norms given as pairs.
        pos: position table (N, D) (or (1, N, D)) added to every image's N patch tokens, after
            post_norm. A table that also covers the prefix rows is split by the caller: its
            first rows are added to the prefix (``prefix = cls + pos[:1]``).
        prefix: (P, D) (or (1, P, D)) rows put before every image's patch tokens: class,
            distillation and register tokens, with their position rows already added.
        stem_norm: the norm over D of every output row, prefix rows included (timm's
            ``norm_pre``, CLIP's ``ln_pre``), as ``post_norm``; None: no such norm.
        stem_eps: its epsilon when given as a pair (default: ``eps``).
        keep: (B, L) int64 patch indices (grid order, last dimension fastest, as the peers
            number patches and tubelets): only those patches are embedded, each image's in
            the order given (repeats allowed), each with its own row of ``pos``; the output
            has L patch tokens per image. Patches not kept get a zero image gradient; the
            table's rows not kept get none.
        pos_index: (B, L) int64: the row of ``pos`` (then any (T, D) table) each patch token
            takes, instead of its grid position's (variable-resolution images with a table
            resized per image, packed rows: see :func:`patch_embed_rows`).
        dynamic_img_pad: zero-pad the end of each spatial dimension to a multiple of the patch
            instead of raising.
        backend: "auto" | "triton" | "eager" (docs/guarantees.md, "Backend selection").

    Returns:
        (B, P + N, D) tokens: the P prefix rows, then N = prod(spatial / patch) patch tokens
        in grid order (last dimension fastest), or the L kept ones.
    """
    # A sequence of sizes gives the rank (a wrong one is named with the input's shape below);
    # any integer (numpy's too) is the size along every spatial dimension.
    sizes = isinstance(patch_size, (tuple, list))
    patch = patch_tuple(patch_size, len(patch_size) if sizes else x.ndim - 2)
    check_input(x, None, patch, dynamic_img_pad)
    check_weight(weight, x.shape[1], patch)
    pre_norm, post_norm = norm_arg(pre_norm, eps, "pre_norm"), norm_arg(post_norm, eps, "post_norm")
    bias, pre_norm, post_norm = checked_params(x, weight, weight.shape, bias, pre_norm, post_norm)
    if dynamic_img_pad:
        x = pad_to_patch(x, patch)
    if keep is not None:
        keep = check_keep(keep, x, patch)
    stem = NO_STEM
    if pos is not None or prefix is not None or stem_norm is not None or pos_index is not None:
        stem_norm = norm_arg(stem_norm, eps if stem_eps is None else stem_eps, "stem_norm")
        stem = check_stem(x, patch, weight.shape[0], Stem(pos, prefix, stem_norm, pos_index),
                          None if keep is None else keep.shape[1])  # fmt: skip
    if dispatch.use_fused(dispatch.check_backend(backend), x):
        args = op_inputs(x, patch, weight, bias, pre_norm, post_norm, stem, keep)
        if not wrapped_operand(args):
            return fused_patch_embed(args)
    return patch_embed_reference(x, patch, weight, bias, pre_norm, post_norm, stem, keep)


def patch_embed_rows(
    rows: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pre_norm: Norm | tuple | None = None,
    post_norm: Norm | tuple | None = None,
    eps: float = 1e-5,
    *,
    pos: Tensor | None = None,
    pos_index: Tensor | None = None,
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
        bias, post_norm, eps, backend: as :func:`patch_embed`.
        pre_norm: as :func:`patch_embed`, its (K,) vectors in the rows' own order, for either
            form of the weight.
        pos: a (T, D) position table; with ``pos_index`` (L,) int64, row ``pos_index[i]`` is
            added to token i (packed rows of several images, each with its own rows of a
            table resized for it: SigLIP2 NaFlex, Idefics3 / SmolVLM bucketed positions);
            without it, T = L and row i goes to token i.

    Returns:
        (L, D) tokens (L may be 0).
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
    if weight.ndim > 2:  # the op reads a pre-norm's vectors in (*patch, c) order
        pre_norm = _in_patch_order(norm_arg(pre_norm, eps, "pre_norm"), tuple(cut))
    if pos is not None and pos_index is None:
        if pos.shape[0] != rows.shape[0]:
            raise ValueError(
                f"pos must have a row per row of patches, ({rows.shape[0]}, D), got "
                f"{tuple(pos.shape)}; or give pos_index"
            )
        pos_index = torch.arange(rows.shape[0], device=rows.device)
    if pos_index is not None:
        if not isinstance(pos_index, Tensor) or pos_index.shape != (rows.shape[0],):
            shape = tuple(pos_index.shape) if isinstance(pos_index, Tensor) else pos_index
            raise ValueError(f"pos_index must have shape (L,) = ({rows.shape[0]},), got {shape}")
        pos_index = pos_index.view(-1, 1)  # one token per "input"
    y = patch_embed(x, cut[1:], weight, bias, pre_norm, post_norm, eps, pos=pos,
                    pos_index=pos_index, backend=backend)  # fmt: skip
    return y.view(rows.shape[0], y.shape[-1])  # (L, 1, D): L may be 0


def _in_patch_order(norm: Norm | None, cut: tuple[int, ...]) -> Norm | None:
    """A pre-norm over rows, its (K,) vectors in the rows' own (c, *patch) order, with them in
    the (*patch, c) order the op reads (a vector of another size is left to the checks, which
    name it)."""
    if norm is None:
        return None

    def reordered(t: Tensor | None) -> Tensor | None:
        if t is None or t.shape != (math.prod(cut),):
            return t
        return t.view(cut).movedim(0, -1).reshape(-1)

    return norm._replace(weight=reordered(norm.weight), bias=reordered(norm.bias))
