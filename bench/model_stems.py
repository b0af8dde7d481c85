"""Whole ViT stems of real models, for the benchmark's "stem" presets:

- the peer: the model's own stem modules (built from the real class with the preset's sizes),
  run as the model runs them: patch projection, class / register tokens, position table and
  the LayerNorm over every row, up to the first transformer block;
- the fused twin: the same module objects, whose parameters go straight into one call of
  ``zeta_fused.functional.patch_embed`` (the conv weight in place, slices of the position
  table, the prefix rows built from the class and register tokens, the norm's vectors). It
  does not go through the model converters, so it measures the op itself.

Only the stem runs: each model is built without transformer blocks (``depth=0``,
``num_hidden_layers=0``) and keeps none of the modules after the stem, which changes neither
the stem's modules nor their initialisation, builds in milliseconds instead of seconds per
benchmark cell, and leaves a training step with the stem's parameters only.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from zeta_fused.functional import patch_embed

from .presets import StemPreset


class MissingPeer(ImportError):
    """The peer's package is not installed: its preset is skipped, never the run."""


# The distribution of each peer package (the wheel to carry under .whl): segment_anything's
# package also imports torchvision, which it does not declare.
DISTRIBUTIONS = {
    "timm": "timm",
    "transformers": "transformers",
    "segment_anything": "segment-anything",
    "diffusers": "diffusers",
    "open_clip": "open-clip-torch",
}


def need(module: str):
    """Import ``module`` of a peer package, or raise :class:`MissingPeer` saying what to carry
    (the package is missing, too old to have the module, or lacks one of its imports)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # What failed to import: the peer itself, or one of its own imports (torchvision).
        top = (getattr(exc, "name", None) or module).partition(".")[0]
        dist = DISTRIBUTIONS.get(top, top)
        raise MissingPeer(
            f"{module} does not import ({exc}): install {dist}, or carry its wheel "
            f"(pip download --no-deps --only-binary=:all: {dist} -d .whl)"
        ) from exc


def versions() -> dict[str, str | None]:
    """The installed version of each peer distribution (None: not installed), for the run's
    record."""
    from importlib import metadata

    out = {}
    for dist in DISTRIBUTIONS.values():
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def heads(dim: int) -> int:
    """Heads of 64, as ViT-L's 16 (one head for a tiny test width). The config checks that
    they divide the width; without layers they are never used."""
    return dim // 64 if dim % 64 == 0 else 1


def conv_patch(conv: nn.Conv2d | nn.Conv3d) -> tuple[int, ...]:
    """The patch of a patchifying conv of any rank (kernel = stride, no padding), checked: the
    fused op knows no other conv."""
    rank = len(conv.kernel_size)
    plain = conv.padding == (0,) * rank and conv.dilation == (1,) * rank
    if conv.stride != conv.kernel_size or not plain:
        raise ValueError(f"not a patchifying conv: {conv}")
    return conv.kernel_size


def affine(norm: nn.LayerNorm) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None], float]:
    return (norm.weight, norm.bias), norm.eps


class PeerStem(nn.Module):
    """A model's stem: ``forward`` is the model's own code, ``fused`` the same parameters
    through the fused op (same output, same gradients)."""

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        raise NotImplementedError


class TimmViT(PeerStem):
    """timm ``vit_base_patch16_224`` (``VisionTransformer``): patch_embed, _pos_embed,
    patch_drop, norm_pre, as its forward_features runs them before the blocks."""

    def __init__(self, p: StemPreset) -> None:
        super().__init__()
        timm = need("timm")
        # One head: with no blocks it is never used, and any width then builds (tiny tests).
        vit = timm.create_model(
            "vit_base_patch16_224",
            pretrained=False,
            depth=0,
            img_size=p.spatial,
            patch_size=p.patch,
            in_chans=p.channels,
            embed_dim=p.dim,
            num_heads=1,
        )
        for after in ("norm", "fc_norm", "head_drop", "head"):  # past the stem
            setattr(vit, after, nn.Identity())
        if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class:
            raise ValueError("the timm preset is a class token with positions covering it")
        _check_no_dropout(vit.pos_drop, vit.patch_drop)
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        v = self.vit
        proj, pos = v.patch_embed.proj, v.pos_embed[0]
        post_norm, eps = _optional_norm(v.patch_embed.norm)
        stem_norm, stem_eps = _optional_norm(v.norm_pre)
        return patch_embed(
            x,
            conv_patch(proj),
            proj.weight,
            proj.bias,
            post_norm=post_norm,
            eps=eps,
            pos=pos[1:],
            prefix=v.cls_token[0] + pos[:1],
            stem_norm=stem_norm,
            stem_eps=stem_eps,
            backend=backend,
        )


def _check_no_dropout(*modules: nn.Module) -> None:
    """The fused twin leaves out the stem's dropouts: they must be no-ops (p = 0, as the
    models' configs have it), or its training step would compute something else."""
    for m in modules:
        if not isinstance(m, nn.Identity) and getattr(m, "p", None) != 0:
            raise ValueError(f"the stem has a dropout: {m}")


def _optional_norm(norm: nn.Module):
    """(weight, bias) and eps of a LayerNorm, or (None, 1e-5) for timm's Identity."""
    if isinstance(norm, nn.Identity):
        return None, 1e-5
    if type(norm) is not nn.LayerNorm:
        raise ValueError(f"the fused op has no {type(norm).__name__}")
    return affine(norm)


class CLIPVision(PeerStem):
    """transformers ``CLIPVisionModel``: ``CLIPVisionEmbeddings`` (no-bias conv, class
    embedding, positions over it) then ``pre_layrnorm``."""

    def __init__(self, p: StemPreset) -> None:
        super().__init__()
        # The modeling module through need(): transformers imports it lazily, and a failing
        # import (a missing dependency of it) must skip the preset, not fail its cells.
        clip = need("transformers.models.clip.modeling_clip")
        config = need("transformers").CLIPVisionConfig(
            hidden_size=p.dim,
            image_size=p.height,
            patch_size=p.patch[0],
            num_channels=p.channels,
            num_hidden_layers=0,
            num_attention_heads=heads(p.dim),
        )
        model = clip.CLIPVisionModel(config)
        vision = getattr(model, "vision_model", model)  # transformers 4 wraps it once more
        self.embeddings, self.pre_layrnorm = vision.embeddings, vision.pre_layrnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(x))

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        e = self.embeddings
        conv, pos = e.patch_embedding, e.position_embedding.weight
        stem_norm, stem_eps = affine(self.pre_layrnorm)
        return patch_embed(
            x,
            conv_patch(conv),
            conv.weight,
            pos=pos[1:],
            prefix=e.class_embedding[None] + pos[:1],
            stem_norm=stem_norm,
            stem_eps=stem_eps,
            backend=backend,
        )


class Dinov2Registers(PeerStem):
    """transformers ``Dinov2WithRegistersEmbeddings``: class token, positions over it, then
    the registers spliced between the class token and the patches. Its config is at the
    preset's image size, so the table is used as it is: at another size both paths would first
    call the same interpolation, which stays with the peer."""

    def __init__(self, p: StemPreset) -> None:
        super().__init__()
        # The module first: a transformers older than it raises MissingPeer, not AttributeError.
        dino = need("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers")
        config = need("transformers").Dinov2WithRegistersConfig(
            hidden_size=p.dim,
            image_size=p.height,
            patch_size=p.patch[0],
            num_channels=p.channels,
            num_register_tokens=p.prefix - 1,
            num_hidden_layers=0,
            num_attention_heads=heads(p.dim),
        )
        self.embeddings = dino.Dinov2WithRegistersEmbeddings(config)
        _check_no_dropout(self.embeddings.dropout)
        # Without a mask the model never reads mask_token: it gets no gradient in either path.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeddings(x)

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        e = self.embeddings
        conv, pos = e.patch_embeddings.projection, e.position_embeddings[0]
        prefix = torch.cat([e.cls_token[0] + pos[:1], e.register_tokens[0]])
        return patch_embed(
            x,
            conv_patch(conv),
            conv.weight,
            conv.bias,
            pos=pos[1:],
            prefix=prefix,
            backend=backend,
        )


class SamViT(PeerStem):
    """segment_anything ``ImageEncoderViT`` (SAM ViT-B): patch_embed (tokens as an NHWC grid)
    plus the (1, H, W, D) position table."""

    def __init__(self, p: StemPreset) -> None:
        super().__init__()
        sam = need("segment_anything.modeling.image_encoder")
        encoder = sam.ImageEncoderViT(
            img_size=p.height,
            patch_size=p.patch[0],
            in_chans=p.channels,
            embed_dim=p.dim,
            depth=0,
            use_abs_pos=True,
        )
        encoder.neck = nn.Identity()  # past the stem
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The first two lines of ImageEncoderViT.forward (the rest: blocks, then the neck).
        return self.encoder.patch_embed(x) + self.encoder.pos_embed

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        conv, pos = self.encoder.patch_embed.proj, self.encoder.pos_embed
        grid = pos.shape[1:3]
        tokens = patch_embed(
            x,
            conv_patch(conv),
            conv.weight,
            conv.bias,
            pos=pos.view(-1, pos.shape[-1]),
            backend=backend,
        )
        return tokens.view(x.shape[0], *grid, -1)  # the token rows are already the NHWC grid


class DiT(PeerStem):
    """diffusers ``PatchEmbed`` as ``DiTTransformer2DModel`` builds it (DiT-XL/2): conv with
    bias and the fixed 2-D sincos table (a buffer). DiT passes no ``layer_norm`` argument and
    the default is False: its stem has no LayerNorm (PatchEmbed's affine-free eps-1e-6 one is
    an option that DiT leaves off)."""

    def __init__(self, p: StemPreset) -> None:
        super().__init__()
        emb = need("diffusers.models.embeddings")
        self.pos_embed = emb.PatchEmbed(
            height=p.height,
            width=p.width,
            patch_size=p.patch[0],
            in_channels=p.channels,
            embed_dim=p.dim,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_embed(x)

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        conv = self.pos_embed.proj
        return patch_embed(
            x,
            conv_patch(conv),
            conv.weight,
            conv.bias,
            pos=self.pos_embed.pos_embed,
            backend=backend,
        )


PEERS: dict[str, type[PeerStem]] = {
    "timm_vit": TimmViT,
    "clip_vision": CLIPVision,
    "dinov2_reg": Dinov2Registers,
    "sam_vit": SamViT,
    "dit": DiT,
}


class FusedStem(nn.Module):
    """The peer's stem (its very modules and parameters) through the fused op."""

    def __init__(self, peer: PeerStem, backend: str) -> None:
        super().__init__()
        self.peer, self.backend = peer, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peer.fused(x, self.backend)


def peer(p: StemPreset) -> PeerStem:
    """The model's own stem for the preset (fp32, on the CPU; the provider moves it)."""
    return PEERS[p.peer](p)


def fused(p: StemPreset, backend: str = "triton") -> FusedStem:
    """The preset's model stem, its parameters run through the fused op on ``backend``."""
    return FusedStem(peer(p), backend)
