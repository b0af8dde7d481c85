"""Block sizes of the kernels, per GEMM operand width (2 bytes: bf16/fp16; 4: fp32).

Chosen from the sm_90 (H100/H200) machine code, without a GPU: no register spills with Triton
3.6 or 3.8 in bf16/fp16 (a few fp32/fp64 variants: 8 bytes), few instructions per tensor-core step
(wide forward chunks and dW tiles share each patch gather among more output columns).
``python tests/aot_compile.py`` prints registers and spills for every variant the launchers
produce; ``python -m bench.tune`` times alternatives on a GPU. Not yet tuned by GPU timings.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Blocks:
    m: int  # tokens per program (a tensor-core M tile), every kernel but the dW GEMM
    k: int  # patch elements per K step: forward, dZ's Z recompute, image gradient
    n: int  # widest forward output chunk; wider rows get an in-program second pass
    dz_n: int  # D chunk of the post-norm backward (it also recomputes Z)
    dz_m: int  # tokens per post-norm-backward program (rows of its column partials)
    dw_m: int  # token step of the dW GEMM (its reduction dimension)
    dw_d: int  # D rows of a dW tile: each token step's gather is shared by all of them
    tile: int  # K columns of a dW tile, and the D step of the image-gradient GEMM
    dx_k: int  # patch columns per image-gradient chunk: dZ is re-read once per chunk
    warps: int = 8  # GEMM kernels: 8 warps keep accumulators and gather pointers in registers
    epilogue_warps: int = 4  # the small parameter-gradient epilogue
    # K columns per epilogue program: narrow, so that even K = 768 spreads over 48 programs
    # (each loops over all D rows of G and W for the column sums dg1, db1).
    epilogue_k: int = 16


BLOCKS = {
    2: Blocks(m=64, k=32, n=256, dz_n=128, dz_m=64, dw_m=64, dw_d=256, tile=64, dx_k=64),
    4: Blocks(m=64, k=16, n=64, dz_n=32, dz_m=64, dw_m=16, dw_d=64, tile=64, dx_k=16),
}


def blocks_for(itemsize: int) -> Blocks:
    """Blocks for GEMM operands of ``itemsize`` bytes (fp64 runs with the fp32 table)."""
    return BLOCKS[min(itemsize, 4)]
