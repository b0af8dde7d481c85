"""``PatchEmbeddings``: zeta's documented module, fused on CUDA, eager everywhere else."""

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
    pad_to_patch,
    resolve_patch_size,
)
from .reference import PATCHIFY


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
        self.dim_in, self.dim_out = dim_in, dim_out
        self.patch_size = (ph, pw)
        self.eps = eps
        self.dynamic_img_pad = dynamic_img_pad
        self.backend = dispatch.check_backend(backend)
        self.embedding = nn.Sequential(
            Rearrange(PATCHIFY, p1=ph, p2=pw),
            nn.LayerNorm(patch_dim, eps=eps, **factory) if pre_norm else nn.Identity(),
            nn.Linear(patch_dim, dim_out, bias=bias, **factory),
            nn.LayerNorm(dim_out, eps=eps, **factory) if post_norm else nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.dim_in, self.patch_size, self.dynamic_img_pad)
        _, ln1, proj, ln2 = self.embedding
        pre = (ln1.weight, ln1.bias) if isinstance(ln1, nn.LayerNorm) else None
        post = (ln2.weight, ln2.bias) if isinstance(ln2, nn.LayerNorm) else None
        check_params(x, [proj.weight, proj.bias])
        if self.dynamic_img_pad:
            x = pad_to_patch(x, self.patch_size)
        if dispatch.use_fused(self.backend, x):
            return fused_patch_embed(
                x, self.patch_size, proj.weight, proj.bias, pre, post, self.eps
            )
        return self.embedding(x)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, backend={self.backend!r}"
