"""Token-subset stems of real models, for the benchmark's "subset" presets (masked pretraining
and patch dropout):

- the peer: the model's own stem modules, run as the model runs them: every patch embedded,
  the position table added, the kept tokens gathered (MAE's ``random_masking``, VideoMAE's
  ``embeddings[~bool_masked_pos]``, OpenCLIP's ``PatchDropout``), prefix rows and norm;
- the fused twin: the same module objects, whose parameters and kept patches go into one call
  of ``zeta_fused.functional.patch_embed(..., keep=ids)``, which embeds the kept patches only.

The kept patches are drawn once, from a fixed seed, as each model draws them (a per-image
shuffle, a tube mask, the top of a normal draw), and held by the stem: every provider of a
cell builds the same ones, and no random draw is timed (what each model derives from its draw
on every call is, on both sides: MAE's argsorts, VideoMAE's visible positions). Only the stem
is built (no transformer blocks), as in bench/model_stems.py.
"""

from __future__ import annotations

import torch
from torch import nn

from zeta_fused.functional import patch_embed

from .model_stems import FusedStem, MissingPeer, PeerStem, affine, conv_patch, heads, need
from .presets import SubsetPreset

# The seed of the kept patches: the same for every provider of a cell.
KEEP_SEED = 0


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(KEEP_SEED)


def mae_masking(noise: torch.Tensor, kept: int) -> tuple[torch.Tensor, ...]:
    """ViTMAEEmbeddings.random_masking's index bookkeeping, without its gather: ids_keep (the
    patches to embed), and the mask and ids_restore the model returns for its decoder and
    loss."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(noise.shape, device=noise.device)
    mask[:, :kept] = 0
    return ids_shuffle[:, :kept], torch.gather(mask, 1, ids_restore), ids_restore


class MAE(PeerStem):
    """transformers ``ViTMAEEmbeddings`` (MAE's encoder stem): conv with bias, the fixed sincos
    table (frozen), ``random_masking`` (argsort of per-image noise; the first
    int(N (1 - mask_ratio)) kept), then the class token with its table row prepended."""

    def __init__(self, p: SubsetPreset) -> None:
        super().__init__()
        # The modeling module through need(): transformers imports it lazily, and a failing
        # import (a missing dependency of it) must skip the preset, not fail its cells.
        vit_mae = need("transformers.models.vit_mae.modeling_vit_mae")
        config = need("transformers").ViTMAEConfig(
            hidden_size=p.dim,
            image_size=p.spatial[0],
            patch_size=p.patch[0],
            num_channels=p.channels,
            mask_ratio=p.drop,
            num_hidden_layers=0,
            num_attention_heads=heads(p.dim),
        )
        self.embeddings = vit_mae.ViTMAEModel(config).embeddings  # its sincos table set
        self.kept = p.kept
        # The noise as ranks (int64): moving the stem to bf16 leaves it alone (bf16 noise would
        # tie), and argsort orders it as it would the float noise it stands for.
        noise = torch.rand(p.batch, p.tokens, generator=_generator())
        self.register_buffer("noise", noise.argsort(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _mask, _ids_restore = self.embeddings(x, noise=self.noise)
        return tokens

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        e = self.embeddings
        conv, pos = e.patch_embeddings.projection, e.position_embeddings[0]
        ids_keep, _mask, _ids_restore = mae_masking(self.noise, self.kept)
        return patch_embed(
            x,
            conv_patch(conv),
            conv.weight,
            conv.bias,
            pos=pos[1:],
            prefix=e.cls_token[0] + pos[:1],
            keep=ids_keep,
            backend=backend,
        )


def tube_mask(p: SubsetPreset, generator: torch.Generator) -> torch.Tensor:
    """VideoMAE's tube masking (its TubeMaskingGenerator): per video, the same spatial
    positions masked in every tubelet frame. (B, N) bool, True: masked."""
    frames = p.spatial[0] // p.patch[0]
    per_frame, visible = p.tokens // frames, p.kept // frames
    if visible * frames != p.kept:
        raise ValueError(f"a tube mask keeps a multiple of {frames} tubelets, not {p.kept}")
    shown = torch.rand(p.batch, per_frame, generator=generator).argsort(1)[:, :visible]
    mask = torch.ones(p.batch, per_frame, dtype=torch.bool).scatter_(1, shown, False)
    return mask.repeat(1, frames)


class VideoMAE(PeerStem):
    """transformers ``VideoMAEEmbeddings`` with ``bool_masked_pos`` (VideoMAE pretraining):
    Conv3d tubelets of a (B, T, C, H, W) video, the fixed sincos table, then the visible tokens
    (``embeddings[~bool_masked_pos]``, grid order). The model keeps its table as a plain CPU
    attribute and copies it to the input's device on every call; here it is a buffer, moved
    with the stem as a user moving the model would expect, so neither path times a host copy
    (the model's own per-call device copy stays)."""

    def __init__(self, p: SubsetPreset) -> None:
        super().__init__()
        videomae = need("transformers.models.videomae.modeling_videomae")
        config = need("transformers").VideoMAEConfig(
            image_size=p.spatial[1],
            patch_size=p.patch[1],
            num_channels=p.channels,
            num_frames=p.spatial[0],
            tubelet_size=p.patch[0],
            hidden_size=p.dim,
            num_hidden_layers=0,
            num_attention_heads=heads(p.dim),
        )
        e = videomae.VideoMAEEmbeddings(config)
        table = e.position_embeddings
        del e.position_embeddings
        e.register_buffer("position_embeddings", table)
        self.embeddings = e
        self.register_buffer("bool_masked_pos", tube_mask(p, _generator()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeddings(x, self.bool_masked_pos)

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        e = self.embeddings
        conv = e.patch_embeddings.projection
        keep = (~self.bool_masked_pos).nonzero()[:, 1].view(x.shape[0], -1)
        return patch_embed(
            x.permute(0, 2, 1, 3, 4),  # (B, C, T, H, W), read in place
            conv_patch(conv),
            conv.weight,
            conv.bias,
            pos=e.position_embeddings[0],
            keep=keep,
            backend=backend,
        )


class FixedPatchDropout(nn.Module):
    """OpenCLIP's ``PatchDropout`` (class token excluded, ``x[batch_indices, keep]``, class
    token put back) with its kept patches drawn once, as it draws them (the top L of a normal
    draw per image), instead of on every call (on the host): that draw is the fused twin's keep
    index. It drops in both modes, as the training stem the benchmark times."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_tokens, x = x[:, :1], x[:, 1:]
        batch_indices = torch.arange(x.shape[0], device=x.device)[..., None]
        return torch.cat((cls_tokens, x[batch_indices, self.keep]), dim=1)


class FLIP(PeerStem):
    """OpenCLIP ``VisionTransformer`` with ``patch_dropout`` (FLIP): no-bias conv, class
    embedding, learned table over it, patch dropout, ``ln_pre`` (its ``_embeds``)."""

    def __init__(self, p: SubsetPreset) -> None:
        super().__init__()
        transformer = need("open_clip.transformer")
        vit = transformer.VisionTransformer(
            image_size=p.spatial[0],
            patch_size=p.patch[0],
            width=p.dim,
            layers=0,
            heads=heads(p.dim),
            mlp_ratio=4.0,
            patch_dropout=p.drop,
        )
        if not hasattr(vit, "_embeds"):
            raise MissingPeer("this open_clip has no VisionTransformer._embeds: upgrade it")
        draw = torch.randn(p.batch, p.tokens, generator=_generator())
        vit.patch_dropout = FixedPatchDropout(draw.topk(p.kept, dim=-1).indices)
        vit.ln_post, vit.proj = nn.Identity(), None  # past the stem
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit._embeds(x)

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        v = self.vit
        pos = v.positional_embedding
        stem_norm, stem_eps = affine(v.ln_pre)
        return patch_embed(
            x,
            conv_patch(v.conv1),
            v.conv1.weight,
            pos=pos[1:],
            prefix=v.class_embedding[None] + pos[:1],
            stem_norm=stem_norm,
            stem_eps=stem_eps,
            keep=v.patch_dropout.keep,
            backend=backend,
        )


PEERS: dict[str, type[PeerStem]] = {"mae": MAE, "videomae": VideoMAE, "flip": FLIP}


def peer(p: SubsetPreset) -> PeerStem:
    """The model's own embed-then-gather stem for the preset (fp32, on the CPU; the provider
    moves it)."""
    return PEERS[p.peer](p)


def fused(p: SubsetPreset, backend: str = "triton") -> FusedStem:
    """The preset's model stem, its parameters and kept patches through the fused op."""
    return FusedStem(peer(p), backend)
