"""What the launch policy takes from a GPU: its architecture, SM count and shared memory per
block (docs/design.md, "Launch policy"), and the shared-memory footprint of the GEMM kernels'
tiles, which the policy fits to that limit.

Triton checks a kernel's shared memory against the device only when it loads the compiled
kernel, and then raises ``OutOfResources``: tiles and pipeline depths tuned on an H100 (227 KiB
per block) overflow a card with 99 KiB (sm_86, sm_89, sm_120) or an MI300's 64 KiB of LDS. The
policy for a device is therefore a pure function of (arch, SM count, shared memory per block),
:func:`for_device`, with the block sizes shrunk until :func:`smem_estimate` fits the limit.
``tests/aot_compile.py --target T`` compiles every kernel variant under the policy of each
architecture in :data:`TARGETS` and checks the shared memory Triton reports against both the
limit and the estimate, so the estimate stays an upper bound as Triton changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple

from .policy import DEFAULT, Blocks, LaunchPolicy

KIB = 1024


class Target(NamedTuple):
    """A GPU architecture the kernels are compiled for (``tests/aot_compile.py --target``)."""

    arch: str  # "sm_90", "gfx942"
    smem_per_block: int  # bytes: the most shared memory (AMD: LDS) one program may use, opt-in
    sm_count: int  # SMs (AMD: CUs) of the part named first: the grid targets of its policy
    parts: str


# Per-block limits: CUDA's cudaDevAttrMaxSharedMemoryPerBlockOptin of each compute capability
# (the "Hardware limit" of Triton's OutOfResources) and the CDNA3 ISA's 64 KiB of LDS.
TARGETS: dict[str, Target] = {
    t.arch: t
    for t in (
        Target("sm_80", 163 * KIB, 108, "A100"),
        Target("sm_86", 99 * KIB, 84, "A40, A10 (72 SMs), RTX 3090 (82)"),
        Target("sm_89", 99 * KIB, 58, "L4, L40S (142 SMs), RTX 4090 (128)"),
        Target("sm_90", 227 * KIB, 132, "H100 SXM, H200"),
        Target("sm_100", 227 * KIB, 148, "B200"),
        Target("sm_120", 99 * KIB, 170, "RTX 5090, RTX PRO 6000 (188 SMs)"),
        Target("gfx942", 64 * KIB, 304, "MI300X, MI325X"),
    )
}

# Bytes per element (compute, widest loaded operand, accumulation) of the calls each Blocks
# table serves, the widest case: the 16-bit table also runs bf16/fp16 GEMMs on fp32 tensors
# (autocast), the 32-bit one fp64 calls.
TABLE_BYTES = {"blocks_16bit": (2, 4, 4), "blocks_32bit": (8, 8, 8)}
# Room for what the estimate does not itemise: mbarriers, reduction scratch, alignment (at most
# 2 KiB + 16 bytes beyond the tiles in the compiles measured: sm_100's dW GEMM at 4 stages).
SLACK = 4 * KIB

# Per GEMM kernel, in its BLOCK_* constexprs: the tiles it loads from memory straight into the
# tensor-core product, with the argument each is read from (Triton pipelines these through
# shared memory, one copy per buffer); the operand it computes in registers and stages once for
# the product (compute dtype); and the accumulator tile its epilogue may re-lay through shared
# memory (accumulation dtype), which reuses the pipeline's space.
KERNEL_TILES: dict[str, tuple] = {
    # The raw patch tile is pipelined too; an inexact one (shifted, cast: kernels/projection.py)
    # is staged again in the compute dtype.
    "_patch_embed_fwd_kernel": (
        (("X", "BLOCK_M", "BLOCK_K"), ("W", "BLOCK_K", "BLOCK_N")),
        ("BLOCK_M", "BLOCK_K"),
        ("BLOCK_M", "BLOCK_N"),
    ),
    "_bwd_dz_kernel": (
        (("W", "BLOCK_K", "BLOCK_N"),),
        ("BLOCK_M", "BLOCK_K"),
        ("BLOCK_M", "BLOCK_N"),
    ),
    # The folded dW GEMM pipelines the image tile too; its normalising loop (other images,
    # chunks the fold would cancel on) stages x̂ instead.
    "_bwd_dw_kernel": (
        (("DZ", "BLOCK_M", "BLOCK_D"), ("X", "BLOCK_M", "BLOCK_K")),
        ("BLOCK_M", "BLOCK_K"),
        ("BLOCK_D", "BLOCK_K"),
    ),
    "_bwd_dx_kernel": (
        (("DZ", "BLOCK_M", "BLOCK_D"), ("W", "BLOCK_D", "BLOCK_K")),
        None,
        ("BLOCK_M", "BLOCK_K"),
    ),
}
# The Blocks field behind each of those constexprs, as the launchers (op/launch.py) pass them;
# each is an upper bound of what a call launches (narrow rows take smaller BLOCK_N / BLOCK_D).
KERNEL_BLOCKS: dict[str, dict[str, str]] = {
    "_patch_embed_fwd_kernel": {"BLOCK_M": "fwd_m", "BLOCK_N": "fwd_n", "BLOCK_K": "fwd_k"},
    "_bwd_dz_kernel": {"BLOCK_M": "dz_m", "BLOCK_N": "dz_n", "BLOCK_K": "k"},
    "_bwd_dw_kernel": {"BLOCK_M": "dw_m", "BLOCK_D": "dw_d", "BLOCK_K": "dw_k"},
    "_bwd_dx_kernel": {"BLOCK_M": "m", "BLOCK_D": "dx_d", "BLOCK_K": "dx_k"},
}
# The Blocks field of each kernel's pipeline depth (the others: "stages").
KERNEL_STAGES: dict[str, str] = {"_patch_embed_fwd_kernel": "fwd_stages"}
# Kernels whose pipelined tiles are addressed through offsets loaded in the same loop (the dW
# GEMM's token rows, XRowOff): Triton gives the offsets a stage of their own and keeps one copy
# fewer of the tiles (measured with sm_90, sm_80 and sm_120 compiles; the compile matrix
# checks it).
INDIRECT = ("_bwd_dw_kernel",)
# Pipelined operands always in the compute dtype (the folded weight, kernels/fold.py), and the
# constexpr that doubles a kernel's weight tiles (two column tiles per step, PAIR).
COMPUTE_OPERANDS: dict[str, tuple[str, ...]] = {"_patch_embed_fwd_kernel": ("W",)}
PAIRED: dict[str, tuple[str, str]] = {"_patch_embed_fwd_kernel": ("PAIR", "fwd_pair")}
MIN_BLOCK = 16  # tl.dot needs every block dimension >= 16


def _cc(arch: str) -> int | None:
    """The compute capability of "sm_XY" (90, 120), None for other architectures."""
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    return int(m.group(1)) if m else None


def tensor_memory(arch: str) -> bool:
    """Whether the architecture's tensor-core products accumulate in tensor memory (tcgen05:
    sm_100 and its kin; consumer Blackwell, sm_120, has mma.sync only)."""
    cc = _cc(arch)
    return cc is not None and 100 <= cc < 120


def default_stages(arch: str) -> int:
    """Software-pipeline depth Triton picks by itself: 2 on AMD GPUs, 3 on NVIDIA ones."""
    return 2 if arch.startswith("gfx") else 3


def pipeline_buffers(arch: str, stages: int) -> int:
    """Copies of each pipelined tile in shared memory. mma.sync architectures (sm_80 to sm_89,
    and sm_120: consumer Blackwell has no wgmma or tcgen05) and Triton's AMD pipeliner keep
    ``stages - 1`` (measured with sm_80/86/89/120 and gfx942 compiles); wgmma (sm_90) and
    tcgen05 (sm_100) keep ``stages``, and so does any architecture not measured yet."""
    cc = _cc(arch)
    mma_sync = cc is not None and (cc < 90 or 120 <= cc < 130)
    return max(stages - 1, 1) if mma_sync or arch == "gfx942" else stages


def smem_estimate(kernel: str, blocks: dict[str, int], loaded: dict[str, int], compute: int,
                  acc: int, arch: str, stages: int) -> int:  # fmt: skip
    """Upper bound of a GEMM kernel's shared memory (bytes) for its BLOCK_* sizes, the bytes
    per element of the arguments its pipelined tiles come from (``loaded``: "W", "DZ"), of the
    compute and accumulation dtypes, on ``arch`` with ``stages`` pipeline stages."""
    pipelined, resident, epilogue = KERNEL_TILES[kernel]
    in_compute = COMPUTE_OPERANDS.get(kernel, ())
    pair = kernel in PAIRED and bool(blocks.get(PAIRED[kernel][0]))
    per_buffer = sum(
        (compute if arg in in_compute else loaded[arg])
        * blocks[r]
        * blocks[c]
        * (2 if pair and arg == "W" else 1)
        for arg, r, c in pipelined
    )
    staged = 0 if resident is None else compute * math.prod(blocks[d] for d in resident)
    copies = pipeline_buffers(arch, stages) - (kernel in INDIRECT)
    tiles = max(copies, 1) * per_buffer + staged + SLACK
    return max(tiles, acc * math.prod(blocks[d] for d in epilogue))


def policy_estimates(pol: LaunchPolicy, field: str, arch: str) -> dict[str, int]:
    """:func:`smem_estimate` of every GEMM kernel under ``pol``'s Blocks table ``field`` (the
    widest calls it serves, :data:`TABLE_BYTES`), per kernel."""
    blocks = getattr(pol, field)
    compute, loaded, acc = TABLE_BYTES[field]
    return {
        kernel: smem_estimate(kernel, {c: getattr(blocks, f) for c, f in fields.items()}
                              | ({PAIRED[kernel][0]: getattr(blocks, PAIRED[kernel][1])}
                                 if kernel in PAIRED else {}),
                              {"X": loaded, "W": loaded, "DZ": loaded}, compute, acc, arch,
                              getattr(blocks, KERNEL_STAGES.get(kernel, "stages")))
        for kernel, fields in KERNEL_BLOCKS.items()
    }  # fmt: skip


def fit_blocks(pol: LaunchPolicy, field: str, arch: str, smem: int) -> Blocks:
    """``pol``'s Blocks table ``field`` with its tiles shrunk until every GEMM kernel's estimate
    fits ``smem`` bytes: the largest block dimension of an overflowing kernel is halved first
    (the pipeline keeps hiding latency); once that kernel's tiles are all at the smallest, the
    table loses a stage."""
    while True:
        over = [k for k, e in policy_estimates(pol, field, arch).items() if e > smem]
        blocks = getattr(pol, field)
        if not over:
            return blocks
        fields = KERNEL_BLOCKS[over[0]].values()
        stages = KERNEL_STAGES.get(over[0], "stages")
        widest = max(fields, key=lambda f: getattr(blocks, f))
        if getattr(blocks, widest) > MIN_BLOCK:
            blocks = dataclasses.replace(blocks, **{widest: getattr(blocks, widest) // 2})
        elif getattr(blocks, stages) > 1:
            blocks = dataclasses.replace(blocks, **{stages: getattr(blocks, stages) - 1})
        else:
            raise ValueError(f"no tiles of {over[0]} fit {smem} bytes of shared memory on {arch}")
        pol = dataclasses.replace(pol, **{field: blocks})


@functools.cache  # one object per device kind: the launchers' caches are keyed by the policy
def for_device(arch: str, sm_count: int, smem_per_block: int) -> LaunchPolicy:
    """The launch policy of a GPU: grid targets from its SM count (the defaults were set for the
    132 SMs of an H100/H200, which get them unchanged), the pipeline depth Triton would pick
    for its architecture, and block sizes fitted to its shared memory per block."""
    small_grid = -(-sm_count // 4)  # a quarter of the SMs (see LaunchPolicy.small_grid)
    forward = {}
    if tensor_memory(arch):
        # The accumulators live in tensor memory, not registers: one 256-column tile keeps no
        # registers for them (pairs are for wgmma), and Triton 3.6's warp specialisation for
        # these parts fails on a pair's second tile (an assertion in NVWSInsertTmemAref).
        forward = {"fwd_pair": False, "fwd_n": 2 * DEFAULT.blocks_16bit.fwd_n}
    pol = dataclasses.replace(
        DEFAULT,
        blocks_16bit=dataclasses.replace(
            DEFAULT.blocks_16bit,
            stages=default_stages(arch),
            fwd_stages=default_stages(arch),
            **forward,
        ),
        blocks_32bit=dataclasses.replace(
            DEFAULT.blocks_32bit, stages=default_stages(arch), fwd_stages=default_stages(arch)
        ),
        small_grid=small_grid,
        relayout_min_tokens=small_grid * DEFAULT.blocks_16bit.m,
        dw_target_programs=2 * sm_count,
        dz_programs=sm_count,
        # The register cap was fitted to sm_90's code (wgmma keeps the accumulator out of the
        # operand registers); mma.sync parts would spill under it.
        dw_max_registers=DEFAULT.dw_max_registers if arch == "sm_90" else None,
    )
    return dataclasses.replace(
        pol,
        blocks_16bit=fit_blocks(pol, "blocks_16bit", arch, smem_per_block),
        blocks_32bit=fit_blocks(pol, "blocks_32bit", arch, smem_per_block),
    )


def for_target(name: str) -> LaunchPolicy:
    """The policy the compile matrix uses for an architecture of :data:`TARGETS`."""
    t = TARGETS[name]
    return for_device(t.arch, t.sm_count, t.smem_per_block)


def arch_of(props) -> str:
    """The architecture's name: sm_XY from a CUDA device's properties, gfxNNN from a ROCm
    one's (its gcnArchName without the feature flags)."""
    import torch

    if torch.version.hip is not None:
        return props.gcnArchName.split(":")[0]
    return f"sm_{props.major}{props.minor}"


def limits_of(props) -> tuple[str, int, int]:
    """(arch, SM count, shared memory per block) of ``torch.cuda.get_device_properties``: the
    opt-in maximum per block where the runtime reports one (what Triton checks against)."""
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return arch_of(props), props.multi_processor_count, optin or props.shared_memory_per_block


def device_policy(index: int) -> LaunchPolicy:
    """The policy of CUDA device ``index`` (for_device caches it per kind of device)."""
    import torch

    return for_device(*limits_of(torch.cuda.get_device_properties(index)))
