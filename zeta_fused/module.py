"""``PatchEmbeddings``: zeta's documented module, fused on CUDA, eager everywhere else.

Its ``embedding`` is a :class:`FusedPatchSequential`: vit-pytorch's ``to_patch_embedding``
Sequential (Rearrange, LayerNorm?, Linear, LayerNorm?) whose forward runs the fused op when the
backend allows and is literally the Sequential otherwise.
"""

from __future__ import annotations

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from . import dispatch
from .functional import (
    PatchSize,
    check_input,
    check_params,
    fused_patch_embed,
    op_inputs,
    pad_to_patch,
    resolve_patch_size,
)
from .reference import PATCHIFY

# vit-pytorch's patch layouts fused here: tokens as (B, N, K), or on the grid as (B, h, w, K).
FUSABLE_PATTERNS = {PATCHIFY: False, "b c (h p1) (w p2) -> b h w (p1 p2 c)": True}


def _param(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` without ``nn.Module.__getattr__`` (about 0.5 us each on the per-call
    host path, which reads six); anything not registered as a parameter (a parametrization's
    property, weight_norm's recomputed attribute) still goes through ``getattr``."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def parse_patch_sequential(layers: nn.Sequential) -> tuple[dict, str | None]:
    """Read (patch, LayerNorm/Linear positions, eps) from a vit-pytorch patch-embedding
    Sequential; returns (config, None), or (partial config, why it cannot be fused)."""
    mods = list(layers._modules.items())
    first = mods[0][1] if mods else None
    pattern = " ".join(first.pattern.split()) if isinstance(first, Rearrange) else None
    if pattern not in FUSABLE_PATTERNS:
        return {}, f"first layer is not a Rearrange with one of {list(FUSABLE_PATTERNS)}"
    ph, pw = first.axes_lengths.get("p1"), first.axes_lengths.get("p2")
    if not (ph and pw):
        return {}, "Rearrange without p1 / p2 lengths"
    kinds = [type(m) for _, m in mods[1:]]
    layouts = {
        (nn.Linear,): (None, 1, None),
        (nn.LayerNorm, nn.Linear): (1, 2, None),
        (nn.Linear, nn.LayerNorm): (None, 1, 2),
        (nn.LayerNorm, nn.Linear, nn.LayerNorm): (1, 2, 3),
    }
    # nn.Identity in a norm's place is the same as no norm.
    idx = [i for i, k in enumerate(kinds, 1) if k is not nn.Identity]
    layout = layouts.get(tuple(kinds[i - 1] for i in idx))
    if layout is None:
        return {}, f"layers after Rearrange are {[k.__name__ for k in kinds]}"
    names = [mods[idx[p - 1]][0] if p else None for p in layout]
    ln1, proj, ln2 = (layers._modules[n] if n else None for n in names)
    for ln, size in ((ln1, proj.in_features), (ln2, proj.out_features)):
        if ln is not None and tuple(ln.normalized_shape) != (size,):
            return {}, f"LayerNorm{tuple(ln.normalized_shape)} does not match ({size},)"
    eps = {ln.eps for ln in (ln1, ln2) if ln is not None}
    if len(eps) > 1:
        return {}, f"the two LayerNorms have different eps {sorted(eps)}"
    if proj.in_features % (ph * pw):
        return {}, f"Linear in_features {proj.in_features} is not a multiple of {ph}x{pw}"
    config = {
        "names": tuple(names),
        "patch_size": (ph, pw),
        "dim_in": proj.in_features // (ph * pw),
        "eps": eps.pop() if eps else 1e-5,
        "grid_output": FUSABLE_PATTERNS[pattern],
    }
    return config, None


class FusedPatchSequential(nn.Sequential):
    """A vit-pytorch patch-embedding Sequential with a fused forward (same children, same
    state-dict keys). Build it from layers, or convert an existing Sequential in place with
    :meth:`fuse_in_place`."""

    def __init__(self, *layers: nn.Module, dynamic_img_pad: bool = False, backend: str = "auto"):
        super().__init__(*layers)
        self._configure(dynamic_img_pad, backend)

    @classmethod
    def fuse_in_place(cls, seq: nn.Sequential, backend: str = "auto") -> str | None:
        """Turn ``seq`` into this class (same object); returns why not, or None when done."""
        why = parse_patch_sequential(seq)[1]
        if why is None:
            seq.__class__ = cls
            seq._configure(False, backend)
        return why

    def _configure(self, dynamic_img_pad: bool, backend: str) -> None:
        config, why = parse_patch_sequential(self)
        if why:
            raise ValueError(f"cannot fuse this Sequential: {why}")
        self._ln1, self._proj, self._ln2 = config["names"]
        self.patch_size = config["patch_size"]
        self.dim_in = config["dim_in"]
        self.eps = config["eps"]
        self.grid_output = config["grid_output"]
        self.dynamic_img_pad = dynamic_img_pad
        self.backend = dispatch.check_backend(backend)

    def _norm(self, name: str | None) -> tuple[Tensor, Tensor] | None:
        if name is None:
            return None
        ln = self._modules[name]
        return _param(ln, "weight"), _param(ln, "bias")

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.dim_in, self.patch_size, self.dynamic_img_pad)
        proj = self._modules[self._proj]
        weight, bias = _param(proj, "weight"), _param(proj, "bias")
        pre, post = self._norm(self._ln1), self._norm(self._ln2)
        check_params(x, [weight, bias, *(pre or ()), *(post or ())])
        if self.dynamic_img_pad:
            x = pad_to_patch(x, self.patch_size)
        if dispatch.use_fused(self.backend, x):
            y = fused_patch_embed(op_inputs(x, self.patch_size, weight, bias, pre, post, self.eps))
            if self.grid_output:
                y = y.view(x.shape[0], x.shape[2] // self.patch_size[0], -1, y.shape[-1])
            return y
        return super().forward(x)


class PatchEmbeddings(nn.Module):
    """Image (B, C, H, W) -> patches -> LayerNorm -> Linear -> LayerNorm -> tokens (B, N, D).

    Args:
        dim_in: image channels C.
        dim_out: token width D.
        seq_len: pixels per patch (zeta's meaning): the projection's input width is
            ``seq_len * dim_in``; without ``patch_size`` the patch is square with side
            ``isqrt(seq_len)``.
        patch_size: int or (ph, pw), instead of or consistent with ``seq_len``.
        pre_norm / post_norm: LayerNorm over the flattened patch / over the output.
        bias: projection bias.
        eps: LayerNorm epsilon.
        dynamic_img_pad: zero-pad bottom/right to a multiple of the patch (as timm).
        backend: "auto" | "triton" | "eager"; ``ZETA_FUSED_BACKEND`` overrides "auto".

    The parameters live in ``self.embedding`` (Rearrange, LayerNorm or Identity, Linear,
    LayerNorm or Identity), so state-dict keys match zeta's ``PatchEmbeddings`` and a vit-pytorch
    ``to_patch_embedding`` state dict loads with an ``embedding.`` prefix.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        seq_len: int | None = None,
        *,
        patch_size: PatchSize | None = None,
        pre_norm: bool = True,
        post_norm: bool = True,
        bias: bool = True,
        eps: float = 1e-5,
        dynamic_img_pad: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        ph, pw = resolve_patch_size(seq_len, patch_size)
        patch_dim = dim_in * ph * pw
        factory = {"device": device, "dtype": dtype}
        self.embedding = FusedPatchSequential(
            Rearrange(PATCHIFY, p1=ph, p2=pw),
            nn.LayerNorm(patch_dim, eps=eps, **factory) if pre_norm else nn.Identity(),
            nn.Linear(patch_dim, dim_out, bias=bias, **factory),
            nn.LayerNorm(dim_out, eps=eps, **factory) if post_norm else nn.Identity(),
            dynamic_img_pad=dynamic_img_pad,
            backend=backend,
        )
        self.dim_in, self.dim_out = dim_in, dim_out
        self.patch_size = (ph, pw)
        self.eps = eps

    @property
    def backend(self) -> str:
        return self.embedding.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.embedding.backend = dispatch.check_backend(value)

    @property
    def dynamic_img_pad(self) -> bool:
        return self.embedding.dynamic_img_pad

    @dynamic_img_pad.setter
    def dynamic_img_pad(self, value: bool) -> None:
        self.embedding.dynamic_img_pad = value

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(x)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, backend={self.backend!r}"
