"""Launch settings as data: block sizes and the launchers' tunable decisions, in one frozen
object (docs/design.md, "Launch policy").

The launchers read :func:`for_tensor` once per call: on a GPU the policy derived from that
device's properties (``devices.for_device``: grid targets from its SM count, tiles fitted to its
shared memory), on the CPU interpreter :data:`DEFAULT`. Tests and ``bench.tune`` change it for a
while with :func:`override`, never by patching module globals. The defaults were chosen from the
sm_90 (H100/H200) machine code (``python tests/aot_compile.py`` prints registers, spills and the
instructions of every loop); ``python -m bench.tune`` times alternatives on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from ..dispatch import interpreting


@dataclass(frozen=True)
class Blocks:
    """Block sizes of the kernels for one GEMM operand width."""

    m: int  # tokens per program (a tensor-core M tile) of the image-gradient kernel
    k: int  # patch elements per K step of dZ's Z recompute
    dz_n: int  # D chunk of the post-norm backward (it also recomputes Z)
    dz_m: int  # tokens per post-norm-backward program (rows of its column partials)
    dw_m: int  # token step of the dW GEMM (its reduction dimension)
    dw_d: int  # D rows of a dW tile: each token step's gather is shared by all of them
    dw_k: int  # K columns of a dW tile
    dx_d: int  # D step of the image-gradient GEMM
    dx_k: int  # patch columns per image-gradient chunk: dZ is re-read once per chunk
    warps: int = 8  # GEMM kernels: 8 warps keep accumulators and gather pointers in registers
    # D rows per step of the dW kernel's finishing sums (G's split slots, dW, dg1, db1): few
    # registers, so that they do not raise the GEMM loop's count.
    param_d: int = 32
    # Software-pipeline depth of the GEMM kernels' loops (Triton's num_stages): shared memory
    # grows with it (devices.smem_estimate). 3 is Triton's own default on NVIDIA GPUs.
    stages: int = 3
    # The forward (kernels/patch_embed_fwd.py): BLOCK_M tokens x BLOCK_N columns per tile and
    # BLOCK_K patch elements per step, both operands streamed through shared memory. The wide
    # tile (128 tokens) halves the weight traffic of 64-token tiles and gives each of two
    # warpgroups a 64-row wgmma per step; its columns come in pairs of 128-column tiles
    # (fwd_pair), which reads each patch tile once per 256 columns while each epilogue keeps
    # within the registers (a 256-column tile spills). The small tile serves grids that would
    # leave SMs idle (small_grid).
    fwd_m: int = 128
    fwd_n: int = 128
    fwd_pair: bool = True
    fwd_k: int = 64
    fwd_small_m: int = 64
    fwd_small_n: int = 64
    fwd_warps: int = 8
    fwd_small_warps: int = 4  # one warpgroup: a 64-token tile is one wgmma M
    fwd_stages: int = 3
    # Columns per step of the passes that finish rows wider than a tile (epilogue.finish_rows):
    # narrower than the tile, so that they need fewer registers than the main loop leaves.
    sweep_n: int = 64
    # Rows per program of the kernel that finishes rows shared by several forward programs.
    finish_m: int = 32

    def sizes(self) -> list[int]:
        """Every block dimension (each a power of two, at least tl.dot's 16)."""
        return [v for f, v in vars(self).items() if f not in _NOT_SIZES]

    def counts(self) -> list[int]:
        """Warps and pipeline stages (each at least 1)."""
        return [getattr(self, f) for f in _NOT_SIZES if f != "fwd_pair"]


# Blocks fields that are not block dimensions.
_NOT_SIZES = ("warps", "stages", "fwd_warps", "fwd_small_warps", "fwd_stages", "fwd_pair")


# eq=False: compared and hashed by identity (it keys the launchers' caches; each override is
# a new object).
@dataclass(frozen=True, eq=False)
class LaunchPolicy:
    # GEMM operands of 2 bytes (bf16, fp16) and of 4 (fp32; fp64 runs with these too).
    blocks_16bit: Blocks = Blocks(m=64, k=32, dz_n=128, dz_m=64, dw_m=64, dw_d=256,
                                  dw_k=64, dx_d=64, dx_k=64)  # fmt: skip
    blocks_32bit: Blocks = Blocks(m=64, k=16, dz_n=32, dz_m=64, dw_m=16, dw_d=64,
                                  dw_k=64, dx_d=64, dx_k=16, fwd_m=64, fwd_n=64, fwd_k=32,
                                  fwd_pair=False, fwd_small_m=32, fwd_small_n=32, fwd_warps=4,
                                  finish_m=16)  # fmt: skip
    # Forward grids of fewer row blocks than this (a quarter of the SMs: 33 of an H100/H200's
    # 132) take the small tiles, their columns split across programs.
    small_grid: int = 33
    # Rows and K columns per program of the weight fold (kernels/fold.py): D = 768 spreads over
    # 48 programs.
    fold_d: int = 16
    fold_k: int = 128
    # Calls with nothing to fuse (plan.plain_gemm: rows already laid out, no norm, table or
    # prefix) run as cuBLAS's GEMM (F.linear) instead of the fused kernel.
    cublas_plain_gemm: bool = True
    # Programs wanted for a small forward grid: its tiles' columns are split across programs
    # (the b1 preset: 4 row blocks x 12 column tiles of 64 = 48 programs, not 2).
    fwd_target_programs: int = 132
    # Calls with at least this many tokens (the 64-token programs of small_grid) re-lay the
    # weight and the pre-norm parameters for the kernels (layout.k_order): up to three small
    # copies, which the b1 preset would feel in host time but a training batch does not.
    relayout_min_tokens: int = 33 * 64
    # The kernels that read the weight walk K channels-first only for power-of-two innermost
    # patch widths, whose pixel runs vectorise (bench.tune times the alternative for patch 14).
    channels_first_any_width: bool = False
    # Programs wanted for the dW GEMM (reduction over all tokens): about two waves (twice the
    # SMs: 264 on an H100/H200), one 256-row program resident per SM. More splits only add
    # partials.
    dw_target_programs: int = 264
    # Cap of the dW partial buffer (token splits x D x K in fp32).
    dw_partial_bytes: int = 64 << 20
    # Cap of the token splits: each writes a whole D x K partial that a second stage reads back.
    dw_max_splits: int = 128
    # The dW GEMM takes the image and dZ as stored, the pre-norm folded out of its loop
    # (kernels/patch_embed_bwd_dw.py), where the image is exact in the operand dtype.
    dw_fold: bool = True
    # Registers per thread of the folded dW kernel on sm_90 (ptxas' maxnreg; None: no cap): 128
    # lets two 8-warp programs share an SM. Its main loops need fewer; the code around them
    # (the centring, the finishing sums) would take more, and spills a little under the cap,
    # outside the loops. Not applied to narrow gathers (launch_bwd.CAP_MIN_RUN).
    dw_max_registers: int | None = 128
    # Tokens whose products the centred fold accumulates before subtracting their centring
    # (as many tensor-core steps as a forward with K = 1024 takes; projection.SHIFT_RATIO).
    dw_chunk_tokens: int = 1024
    # Programs of the dZ kernel (persistent over token tiles; one per SM at its registers):
    # the rows of the column partials that the dW kernel sums.
    dz_programs: int = 132
    # The dW kernel's other programs: columns per column program (the vector gradients over
    # D), rows per step of their fixed-order sums, and the position table's blocks (TABLE_N
    # rows x TABLE_D columns, summed over table_b images at a time).
    colsum_c: int = 64
    sum_rows: int = 8
    table_n: int = 16
    table_d: int = 64
    table_b: int = 8
    # The Triton interpreter truncates fp32 -> bf16 and multiplies bf16 wrongly: its kernels
    # round to nearest even by hand and multiply rounded operands in fp32 (kernels/rounding.py).
    # Read once: Triton decides at decoration time whether kernels run interpreted.
    emulate_bf16: bool = interpreting()

    def blocks(self, itemsize: int) -> Blocks:
        """Blocks for GEMM operands of ``itemsize`` bytes."""
        return self.blocks_16bit if itemsize <= 2 else self.blocks_32bit


# The H100/H200 policy (132 SMs, 227 KiB per block), and the CPU interpreter's.
DEFAULT = LaunchPolicy()
# Active override() blocks, innermost last: (replacement base or None, field changes, the
# policies made from each base, by identity).
_overrides: list[tuple[LaunchPolicy | None, dict, dict]] = []
# Device index -> its policy (devices.device_policy), filled on first use.
_by_device: dict[int, LaunchPolicy] = {}


def current() -> LaunchPolicy:
    """The policy of calls on the CPU interpreter (DEFAULT, under any active override)."""
    return _overridden(DEFAULT) if _overrides else DEFAULT


def for_tensor(x) -> LaunchPolicy:
    """The policy of a call on ``x``'s device: that GPU's own (computed from its properties
    once per device), DEFAULT on the CPU interpreter; under any active override."""
    if x.is_cuda:
        index = x.get_device()
        base = _by_device.get(index)
        if base is None:
            from .devices import device_policy

            base = _by_device[index] = device_policy(index)
    else:
        base = DEFAULT
    return _overridden(base) if _overrides else base


def _overridden(pol: LaunchPolicy) -> LaunchPolicy:
    for replacement, changes, made in _overrides:
        base = pol if replacement is None else replacement
        if base not in made:  # one object per base and block: the launchers' caches key on it
            made[base] = dataclasses.replace(base, **{
                name: dataclasses.replace(getattr(base, name), **v) if isinstance(v, dict) else v
                for name, v in changes.items()
            })  # fmt: skip
        pol = made[base]
    return pol


@contextlib.contextmanager
def override(base: LaunchPolicy | None = None, **changes) -> Iterator[LaunchPolicy]:
    """Run the enclosed calls under their device's policy (or ``base`` instead, on every
    device: the compile matrix uses a target's policy) with ``changes`` (field=value; a Blocks
    field may be given as a dict of its own changes). Yields the policy of CPU calls. Process
    wide: for tests, benchmarks and the compile harness, not for concurrent callers."""
    _overrides.append((base, changes, {}))
    try:
        yield current()
    finally:
        _overrides.pop()
