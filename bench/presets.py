"""Benchmark presets (the performance method of docs/design.md) and the --shape parser."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Stem:
    """Figures of a preset from its batch, channels, spatial sizes, patch, width and dtype."""

    @property
    def tokens(self) -> int:
        """Tokens per input (the batch multiplies them)."""
        return math.prod(s // p for s, p in zip(self.spatial, self.patch, strict=True))

    @property
    def patch_dim(self) -> int:
        return self.channels * math.prod(self.patch)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def embedded(self) -> int:
        """Patch tokens embedded per input: every patch of the grid (a subset preset: the kept
        ones)."""
        return self.tokens

    def flops(self) -> int:
        """Forward GEMM flops: 2 * B * N * K * D, N the patch tokens embedded."""
        return 2 * self.batch * self.embedded * self.patch_dim * self.dim

    @property
    def out_rows(self) -> int:
        """Rows written per input: its patch tokens (a whole stem adds its prefix rows)."""
        return self.embedded

    def input_elems(self) -> int:
        """Input elements a forward must read: the whole input (a subset preset: the pixels of
        the kept patches only)."""
        return self.batch * self.channels * math.prod(self.spatial)

    def table_elems(self) -> int:
        """Elements of the parameters and tables a forward reads once: the weight (a whole
        stem adds its bias, position table, prefix rows and norm vectors)."""
        return self.dim * self.patch_dim

    def bytes(self) -> int:
        """Forward compulsory traffic: input read, output rows written, weight (and tables)
        read once."""
        size = self.torch_dtype.itemsize
        return size * (
            self.input_elems() + self.batch * self.out_rows * self.dim + self.table_elems()
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset(_Stem):
    name: str
    batch: int
    channels: int
    height: int
    width: int
    patch: tuple[int, int]
    dim: int
    dtype: str = "bf16"
    e2e: bool = False  # a whole model (timm ViT) rather than the stem alone
    family = "image"  # vit-pytorch / timm image stems and their peers

    @property
    def spatial(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class ConvPreset(_Stem):
    """A conv-projection stem of any rank (bench/conv_stems.py): videos, latents, sequences,
    rows already cut."""

    name: str
    batch: int  # rows: the number of rows L
    channels: int
    spatial: tuple[int, ...]  # rows: the patch itself (one patch per row)
    patch: tuple[int, ...]
    dim: int
    dtype: str = "bf16"
    bias: bool = True
    layout: str = "channels_first"  # or "frames_first" (B, T, C, H, W), or "rows" (L, K)
    e2e = False
    family = "conv"


class _WholeStem(_Stem):
    """Figures of a whole stem: its prefix rows, position table and norm vectors besides the
    projection (fields prefix, pos_prefix, bias, stem_norm)."""

    @property
    def out_rows(self) -> int:
        return self.prefix + self.embedded

    def table_elems(self) -> int:
        """Weight, bias, the whole position table, the prefix rows and the norm's vectors:
        each read once, whatever the batch."""
        rows = (self.pos_prefix + self.tokens) + self.prefix + (2 if self.stem_norm else 0)
        return super().table_elems() + self.dim * (rows + self.bias)


@dataclass(frozen=True)
class StemPreset(_WholeStem):
    """A whole ViT stem of a real model (bench/model_stems.py): patch projection, position
    table, prefix rows and the LayerNorm over every row, against the model's own modules."""

    name: str
    peer: str  # the key of its model in bench.model_stems.PEERS
    batch: int
    channels: int
    height: int
    width: int
    patch: tuple[int, int]
    dim: int
    prefix: int = 0  # prefix rows P (class and register tokens) before the N patch tokens
    pos_prefix: int = 0  # rows of the position table that cover prefix rows ("cat then add")
    bias: bool = True  # the projection has a bias
    stem_norm: bool = False  # an affine LayerNorm over every output row (CLIP's ln_pre)
    dtype: str = "bf16"
    e2e = False
    family = "stem"

    @property
    def spatial(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class SubsetPreset(_WholeStem):
    """A masked-pretraining or token-dropping stem (bench/subset_stems.py): the model embeds
    every patch, adds its table and gathers the kept tokens; the fused op embeds the kept
    patches only (``patch_embed(..., keep=ids)``). Its roofline is the fused path's work;
    :meth:`modelled` sets it beside the model's."""

    name: str
    peer: str  # the key of its model in bench.subset_stems.PEERS
    batch: int
    channels: int
    spatial: tuple[int, ...]
    patch: tuple[int, ...]
    dim: int
    drop: float  # the share of patches the model is configured to drop (its mask ratio)
    kept: int  # patch tokens it keeps per input, L, rounded as the model rounds
    prefix: int = 0
    pos_prefix: int = 0
    bias: bool = True
    stem_norm: bool = False
    layout: str = "channels_first"  # or "frames_first": (B, T, C, H, W), VideoMAE's input
    dtype: str = "bf16"
    e2e = False
    family = "subset"

    @property
    def embedded(self) -> int:
        return self.kept

    def input_elems(self) -> int:
        return self.batch * self.kept * self.patch_dim

    def gather_bytes(self) -> int:
        """The least any embed-everything-then-gather moves: every pixel read and every patch
        token written (the projection is a GEMM or conv of its own), the kept tokens read back,
        the output rows written, the tables read once."""
        size = self.torch_dtype.itemsize
        tokens = self.batch * (self.tokens + self.kept + self.out_rows) * self.dim
        return size * (super().input_elems() + tokens + self.table_elems())

    def gather_flops(self) -> int:
        """Its GEMM: every patch projected."""
        return 2 * self.batch * self.tokens * self.patch_dim * self.dim

    def modelled(self) -> dict:
        """Compulsory bytes and GEMM flops of both paths and their ratios (machine-free
        arithmetic: what a run without a GPU reports for this preset)."""
        return {
            "tokens": self.tokens,
            "kept": self.kept,
            "gather_bytes": self.gather_bytes(),
            "subset_bytes": self.bytes(),
            "bytes_ratio": self.gather_bytes() / self.bytes(),
            "gather_flops": self.gather_flops(),
            "subset_flops": self.flops(),
            "flops_ratio": self.gather_flops() / self.flops(),
        }


def _subset(name, peer, b, spatial, patch, d, drop, kept, cls=False, bias=True, norm=False,
            layout="channels_first") -> SubsetPreset:  # fmt: skip
    """An RGB subset preset; cls: a class token with its own row of the table ("cat then
    add"); norm: the LayerNorm over every row."""
    return SubsetPreset(name, peer, b, 3, spatial, patch, d, drop, kept, int(cls), int(cls),
                        bias, norm, layout)  # fmt: skip


def _square(name, b, c, hw, p, d, dtype="bf16") -> Preset:
    return Preset(name, b, c, hw, hw, (p, p), d, dtype)


def _stem(name, peer, b, c, hw, p, d, prefix=0, pos_prefix=0, bias=True, norm=False) -> StemPreset:
    """A square whole stem; norm: the LayerNorm over every row."""
    return StemPreset(name, peer, b, c, hw, hw, (p, p), d, prefix, pos_prefix, bias, norm)


PRESETS = {
    p.name: p
    for p in [
        _square("seed_doc_example", 32, 3, 224, 4, 64),
        _square("seed_doc_example_fp32", 32, 3, 224, 4, 64, "fp32"),
        _square("vit_b16", 256, 3, 224, 16, 768),
        _square("vit_l14", 128, 3, 224, 14, 1024),
        _square("sam_h16_1024", 8, 3, 1024, 16, 1280),
        _square("b1_latency_b16", 1, 3, 224, 16, 768),
        # End to end: timm ViT-B/16 with and without fuse_patch_embeddings.
        Preset("timm_vit_b16_e2e", 64, 3, 224, 224, (16, 16), 768, "bf16", e2e=True),
        # Conv stems of other ranks, each against its own model's module (issue: any rank).
        ConvPreset("videomae_b16", 8, 3, (16, 224, 224), (2, 16, 16), 768, layout="frames_first"),
        ConvPreset(
            "qwen2_5_vl_rows", 16384, 3, (2, 14, 14), (2, 14, 14), 1280, bias=False, layout="rows"
        ),
        ConvPreset("wan_latents", 1, 16, (21, 60, 104), (1, 2, 2), 1536),
        ConvPreset("series", 256, 12, (4096,), (16,), 512),
        # Whole stems, each against its own model's eager stem and its torch.compile
        # (name, model, B, C, H=W, patch, D, prefix rows, position rows over the prefix,
        # projection bias, LayerNorm over every row).
        # timm ViT-B/16: class token, a position table covering it, no norm_pre.
        _stem("vit_b16_stem", "timm_vit", 256, 3, 224, 16, 768, 1, 1),
        # CLIP ViT-L/14 at 336: no-bias conv, class embedding, positions over it, ln_pre.
        _stem("clip_l14_336_stem", "clip_vision", 64, 3, 336, 14, 1024, 1, 1, False, True),
        # DINOv2-L/14 with 4 registers: positions cover the class token, registers spliced after.
        _stem("dinov2_l14_reg_stem", "dinov2_reg", 64, 3, 224, 14, 1024, 5, 1),
        # SAM ViT-B image encoder at 1024: NHWC tokens plus a grid position table, no prefix.
        _stem("sam_b16_1024_stem", "sam_vit", 4, 3, 1024, 16, 768),
        # DiT-XL/2 on 256 px images (4x32x32 latents): conv + fixed sincos table, no norm.
        _stem("dit_xl2_256_stem", "dit", 64, 4, 32, 2, 1152),
        # Token subsets, each against its model's embed-then-gather and its torch.compile, at
        # the per-GPU batch of the paper's pretraining (name, model, B, C, spatial, patch, D,
        # drop ratio, patches kept per input as the model rounds them).
        # MAE ViT-L/16 (64 per GPU x 64 GPUs): fixed sincos table, class token, keep
        # int(196 x 0.25) = 49.
        _subset("mae_l16_subset", "mae", 64, (224, 224), (16, 16), 1024, 0.75, 49, cls=True),
        # VideoMAE ViT-B, 16 frames (32 per GPU, its pretraining script): tubelets 2x16x16,
        # fixed sincos table, no class token; tube masking drops int(0.9 x 196) = 176 of each
        # frame's 196 positions, the same in all 8 tubelet frames: 8 x 20 = 160 kept of 1568.
        _subset(
            "videomae_b16_subset",
            "videomae",
            32,
            (16, 224, 224),
            (2, 16, 16),
            768,
            0.9,
            160,
            layout="frames_first",
        ),
        # FLIP ViT-B/16 as OpenCLIP trains it (patch_dropout 0.5): no-bias conv, class token,
        # learned table over it, ln_pre; keep int(196 x 0.5) = 98. B 256 per GPU is an
        # assumption (FLIP's batch is 32k; the per-device share depends on the cluster).
        _subset(
            "flip_b16_subset",
            "flip",
            256,
            (224, 224),
            (16, 16),
            768,
            0.5,
            98,
            cls=True,
            bias=False,
            norm=True,
        ),
    ]
}
# The small eager-only preset used when there is no GPU.
CPU_PRESET = _square("cpu_small", 8, 3, 64, 8, 128, "fp32")

ALL_MODES = ("fwd", "train", "train_x")
CONV_PRESETS = ("videomae_b16", "qwen2_5_vl_rows", "wan_latents", "series")
STEM_PRESETS = tuple(n for n, p in PRESETS.items() if p.family == "stem")
SUBSET_PRESETS = tuple(n for n, p in PRESETS.items() if p.family == "subset")
# `--preset subset`: every subset preset, forward and training step (pretraining needs no
# image gradient). Not in the quick run: gpu-check runs them after it, within its time cap.
SUBSET_MODES = ("fwd", "train")
# Quick run (make gpu-check): every stem preset's inference forward, training on two of them
# (vit_b16 with the image gradient too: each training goal of the fused backward), and the
# end-to-end timm ViT-B/16 training step.
QUICK_MODES = {"vit_b16": ALL_MODES, "seed_doc_example": ("fwd", "train")}
QUICK = [
    (name, QUICK_MODES.get(name, ("fwd",)))
    for name in (
        "seed_doc_example",
        "seed_doc_example_fp32",
        "vit_b16",
        "vit_l14",
        "sam_h16_1024",
        "b1_latency_b16",
    )
] + [("timm_vit_b16_e2e", ("train",))]
QUICK += [(name, ("fwd", "train")) for name in CONV_PRESETS]
# One whole stem (its goals: forward and training step). The quick run already fills most of
# gpu-check's share of the 10-minute command, and its compile cells run last: the other
# stems (each two more compiles) stay out of it, and run with --preset NAME or all.
QUICK += [("vit_b16_stem", ("fwd", "train"))]


def parse_shape(text: str) -> Preset:
    """'B,C,H,W,patch,D[,dtype]' with patch an int or 'phxpw', e.g. 8,3,224,224,16,768,bf16."""
    parts = text.split(",")
    if len(parts) not in (6, 7):
        raise ValueError(f"--shape wants B,C,H,W,patch,D[,dtype], got {text!r}")
    b, c, h, w = (int(v) for v in parts[:4])
    ph, _, pw = parts[4].partition("x")
    dtype = parts[6] if len(parts) == 7 else "bf16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return Preset(f"shape_{text}", b, c, h, w, (int(ph), int(pw or ph)), int(parts[5]), dtype)
