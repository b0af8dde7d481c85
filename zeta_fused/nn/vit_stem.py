"""``ViTStem``: the whole stem of a new Vision Transformer as one module, fused.

    tokens = PatchEmbeddings(x)                     # patches -> [LN_K] -> Linear -> [LN_D]
    rows   = cat(prefix_tokens, tokens + pos_embed) # learned prefix rows and position table
    out    = norm(rows)                             # [norm over D]: timm's norm_pre, CLIP's ln_pre

The prefix rows (class token, registers) carry no position row: being learned, they absorb
one (timm's ``no_embed_class``; DINOv2 folds its class position into the class token the same
way). The eager path calls the submodules one by one; the fused path computes the same in one
call of the op, whenever nothing would tell the two apart (docs/design.md, "Drop-in rule").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import dispatch
from ..checks import PatchSize, as_int, pair
from ..op.args import Stem
from .norms import norm_problem, norm_value
from .params import any_hook, forwarded, param, plain
from .patch_embed import FusedPatchSequential, PatchEmbeddings


class ViTStem(nn.Module):
    """Image (B, C, H, W) -> (B, P + N, D): patch embedding, prefix tokens, position table and
    pre-transformer LayerNorm in one fused call.

    Args:
        dim_in: image channels C.
        dim_out: token width D.
        image_size: int or (H, W) of the position table (N = H / ph * W / pw rows).
        patch_size: int or (ph, pw).
        num_prefix_tokens: learned rows before the patch tokens (1: a class token; 1 + R: with
            R registers; 0: none).
        pos_embed: a learned (1, N, D) position table for the patch tokens.
        pre_norm, post_norm, bias, eps, norm_layer: as :class:`~zeta_fused.PatchEmbeddings`.
        stem_norm: a norm over D of every output row (prefix rows included), of
            ``norm_layer``.
        stem_eps: its epsilon.
        backend: "auto" | "triton" | "eager" (docs/guarantees.md, "Backend selection").
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        image_size: PatchSize,
        patch_size: PatchSize,
        *,
        num_prefix_tokens: int = 1,
        pos_embed: bool = True,
        pre_norm: bool = False,
        post_norm: bool = False,
        bias: bool = True,
        stem_norm: bool = False,
        eps: float = 1e-5,
        stem_eps: float = 1e-6,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        backend: str = "auto",
    ):
        super().__init__()
        (height, width), (ph, pw) = pair(image_size), pair(patch_size)
        if height % ph or width % pw:
            raise ValueError(
                f"image_size {(height, width)} is not a multiple of the patch {(ph, pw)}"
            )
        num_prefix_tokens = as_int(num_prefix_tokens, "num_prefix_tokens")
        self.patches = PatchEmbeddings(dim_in, dim_out, patch_size=(ph, pw), pre_norm=pre_norm,
                                       post_norm=post_norm, bias=bias, eps=eps,
                                       norm_layer=norm_layer, backend=backend)  # fmt: skip
        self.grid = (height // ph, width // pw)
        tokens = self.grid[0] * self.grid[1]
        self.prefix_tokens = (
            nn.Parameter(0.02 * torch.randn(1, num_prefix_tokens, dim_out))
            if num_prefix_tokens
            else None
        )
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim_out)) if pos_embed else None
        self.norm = norm_layer(dim_out, eps=stem_eps) if stem_norm else nn.Identity()

    backend = forwarded("patches", "backend")  # PatchEmbeddings checks the value

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_zeta_skipped_hooks", None)  # bound to objects of this process: bound again
        return state

    def forward(self, x: Tensor) -> Tensor:
        if dispatch.symbolic_tracing():  # the submodules one by one (docs/design.md, "torch.fx")
            return self._eager(x)
        if self.pos_embed is not None and x.ndim == 4:
            grid = tuple(s // p for s, p in zip(x.shape[2:], self.patches.patch_size, strict=True))
            if grid != self.grid:
                raise ValueError(
                    f"input {tuple(x.shape[2:])} gives a {grid[0]}x{grid[1]} patch grid, but the "
                    f"position table is for {self.grid[0]}x{self.grid[1]}"
                )
        y = self.try_fused(x)
        return self._eager(x) if y is None else y

    def _eager(self, x: Tensor) -> Tensor:
        """The submodules one by one."""
        tokens = self.patches(x)
        pos, prefix = param(self, "pos_embed"), param(self, "prefix_tokens")
        if pos is not None:
            tokens = tokens + pos
        if prefix is not None:
            tokens = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], 1)
        return self.norm(tokens)

    def try_fused(self, x: Tensor) -> Tensor | None:
        """The whole stem as one fused call, or None: the submodules run one by one."""
        norm, patches = self.norm, self.patches
        is_norm = not plain(norm, nn.Identity)
        embedding = patches._modules.get("embedding")
        if (
            (is_norm and norm_problem(norm, patches.dim_out) is not None)
            or not plain(patches, PatchEmbeddings)
            or not plain(embedding, FusedPatchSequential)
            # modules the fused call skips (their children's hooks: try_fused)
            or any_hook(self, "_zeta_skipped_hooks", patches, embedding, norm)
        ):
            return None
        # The (1, n, D) parameters as they are: the op reads a leading 1 as rows (checks._rows).
        stem = Stem(
            param(self, "pos_embed"),
            param(self, "prefix_tokens"),
            norm_value(norm, x.dtype) if is_norm else None,
        )
        return embedding.try_fused(x, stem)

    def extra_repr(self) -> str:
        prefix = 0 if self.prefix_tokens is None else self.prefix_tokens.shape[1]
        return f"grid={self.grid}, num_prefix_tokens={prefix}, backend={self.backend!r}"
