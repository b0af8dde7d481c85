"""Compile every kernel variant the launchers produce for a Hopper GPU, without a GPU.

Run as a script (``python tests/aot_compile.py``) in a process where TRITON_INTERPRET is unset:
the launchers run on CPU tensors with the kernels swapped for recorders, then each recorded
launch is compiled with ``triton.compile`` for sm_90 (ptxas included), so code-generation
errors that the interpreter cannot see fail here. Prints one line per kernel variant with the
registers, spill bytes and shared memory reported by cuobjdump. With ``--tune``, compiles the
variants that ``python -m bench.tune`` times instead (its presets, under each alternative), so a
GPU run spends no time on one that cannot compile.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET first"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import zeta_fused.op.launch as launch  # noqa: E402
from zeta_fused import policy  # noqa: E402
from zeta_fused.functional import op_inputs  # noqa: E402
from zeta_fused.kernels.contract import LAYER_NORM, RMS_NORM  # noqa: E402
from zeta_fused.op.args import (  # noqa: E402
    NO_STEM,
    BwdArgs,  # noqa: E402
    Norm,
    Stem,
)

KERNELS = [
    "_patch_embed_fwd_kernel",
    "_bwd_dz_kernel",
    "_bwd_dw_kernel",
    "_bwd_param_kernel",
    "_bwd_dx_kernel",
    "_segment_sum_kernel",
]
TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
launches: list[tuple] = []
tag = ""  # the bench.tune variant being recorded (--tune)


class Recorder:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((tag, self.kernel, args, kwargs))


def specialise(kernel, args, kwargs) -> tuple[dict, dict, dict, dict]:
    """Signature, constants, attributes and options exactly as the JIT derives them from real
    arguments (Triton's own binder: an int equal to 1 becomes a constant, ints and pointers
    divisible by 16 get a divisibility hint, None and tuples as a launch passes them), so the
    compiled code is the code a GPU launch would compile."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, sig, const, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return sig, const, attrs, options.__dict__


def resource_usage(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return "REG:{} STACK:{} SHARED:{} LOCAL:{}".format(*m.groups()) if m else "usage: n/a"


def loop_sizes(cubin: bytes) -> list[int]:
    """Instructions in each innermost loop of the SASS, in address order. A loop is a backward
    branch and the instructions from its target to it; innermost: it contains no other loop."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    loops = []
    for addr, target in re.findall(
        r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\S*\s+(?:\w+\s+)?0x([0-9a-f]+)", sass
    ):
        start, end = int(target, 16), int(addr, 16)
        if start < end:  # backward: a loop (a branch to itself is the idle tail after EXIT)
            loops.append((start, end))
    inner = [
        (s, e)
        for s, e in loops
        if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)
    ]
    return [(e - s) // 16 + 1 for s, e in sorted(inner)]


def install_recorders() -> None:
    for name in KERNELS:
        setattr(launch, name, Recorder(getattr(launch, name)))


def record_tune_variants() -> None:
    """Every bench.tune variant on the presets of its plan (fused forward and backward)."""
    global tag
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import tune

    presets = [tune.PRESETS[name] for name in dict.fromkeys(p for p, _ in tune.PLAN)]
    for name, changes in tune.VARIANTS.items():
        tag = name
        with policy.override(**changes):
            for p in presets:
                x = torch.randn(p.batch, p.channels, p.height, p.width, dtype=p.torch_dtype)
                run_case(x, p.dim, p.patch[0], True, True, True, False)


def record_all() -> None:
    # (dtype, D, patch, pre, post, bias, conv): D 64 fits one tile, wider rows take the second
    # pass; patch 14 (vit_l14, K = 588) gives other compile-time index arithmetic; a Conv2d
    # weight (timm, transformers) puts the kernels that read it in the (c, i, j) K order.
    cases = [
        (torch.bfloat16, 768, 16, True, True, True, False),
        (torch.bfloat16, 64, 16, True, True, True, False),
        (torch.bfloat16, 64, 4, True, True, True, False),  # seed_doc_example: K = 48
        (torch.bfloat16, 1024, 14, True, True, True, False),
        (torch.bfloat16, 768, 16, False, True, True, True),
        (torch.bfloat16, 768, 16, True, True, True, True),
        (torch.float16, 1024, 16, False, True, True, False),
        (torch.float32, 768, 16, True, True, True, False),
        (torch.bfloat16, 768, 16, False, False, False, False),
        (torch.float64, 64, 16, True, True, True, False),  # gradcheck, fp64 tests run on GPUs too
    ]
    global tag
    for i, (dtype, dim, patch, pre, post, bias, conv) in enumerate(cases):
        # A vit_b16-sized batch: several token splits in the dW GEMM, as on a real run; the
        # first case also runs at batch 1, where the forward takes smaller token tiles.
        for batch in (16, 1) if i == 0 else (16,):
            tag = f"case {i} b{batch}"
            x = torch.randn(batch, 3, 224, 224, dtype=dtype)
            run_case(x, dim, patch, pre, post, bias, conv)


def run_case(x, dim, patch, pre, post, bias, conv, stem=None, kind=LAYER_NORM,
             kept=None) -> None:  # fmt: skip
    """Forward and backward launches for input x and a patch (an int: square) of its rank;
    ``stem``: (prefix rows, position table, stem norm) of a whole-stem case; ``kind``: the
    norms' kind; ``kept``: the patches each image embeds (a keep index), None: all."""
    dtype, chans = x.dtype, x.shape[1]
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    k = chans * math.prod(patch)
    w = torch.randn(dim, chans, *patch, dtype=dtype) if conv else torch.randn(dim, k, dtype=dtype)
    b = torch.randn(dim, dtype=dtype) if bias else None
    g1 = Norm(kind, torch.ones(k, dtype=dtype), torch.zeros(k, dtype=dtype), 1e-5)
    g2 = Norm(kind, torch.ones(dim, dtype=dtype), torch.zeros(dim, dtype=dtype), 1e-5)
    g1, g2 = g1 if pre else None, g2 if post else None
    parts = NO_STEM
    if stem is not None:
        n_prefix, with_pos, with_norm = stem
        tokens = math.prod(s // q for s, q in zip(x.shape[2:], patch, strict=True))
        parts = Stem(
            torch.randn(tokens, dim, dtype=dtype) if with_pos else None,
            torch.randn(n_prefix, dim, dtype=dtype) if n_prefix else None,
            Norm(kind, torch.ones(dim, dtype=dtype), torch.zeros(dim, dtype=dtype), 1e-5)
            if with_norm
            else None,
        )
    keep = None
    if kept is not None:
        tokens = math.prod(s // q for s, q in zip(x.shape[2:], patch, strict=True))
        keep = torch.stack([torch.randperm(tokens)[:kept] for _ in range(x.shape[0])])
    args = op_inputs(x, patch, w, b, g1, g2, parts, keep)
    y, stats = launch.patch_embed_fwd(args)
    launch.patch_embed_bwd(BwdArgs(y, stats, True, *args))


def record_other_ranks() -> None:
    """Sequences and volumes: the kernels take any number of spatial dimensions (the modules
    take images so far), so they must compile too (series: B=256, C=12, L=4096, patch 16;
    video tubelets 2x16x16 read from a (B, T, C, H, W) tensor with a Conv3d weight)."""
    global tag
    tag = "1d"
    run_case(torch.randn(256, 12, 4096, dtype=torch.bfloat16), 512, (16,), True, True, True, False)
    tag = "3d"
    video = torch.randn(2, 16, 3, 224, 224, dtype=torch.bfloat16).transpose(1, 2)
    run_case(video, 768, (2, 16, 16), False, False, True, True)
    tag = "3d norms"  # vit-pytorch's vit_3d: (pf p1 p2 c) Linear, both LayerNorms
    run_case(video.contiguous(), 768, (2, 16, 16), True, True, True, False)


def record_stems() -> None:
    """Whole stems (prefix rows, position table, stem norm) as the benchmark's presets run them:
    timm ViT-B/16 (class token + pos), CLIP ViT-L/14 (no-bias conv, ln_pre), DiT-XL/2 (affine-free
    post-norm + pos on latents), and every norm over D at once in bf16 and fp32 (the dZ kernel's
    middle pass)."""
    global tag
    image = torch.randn(16, 3, 224, 224, dtype=torch.bfloat16)
    tag = "stem vit"
    run_case(image, 768, 16, False, False, True, True, (1, True, False))
    tag = "stem clip"
    run_case(image, 1024, 14, False, False, False, True, (1, True, True))
    tag = "stem dit"
    latents = torch.randn(16, 4, 32, 32, dtype=torch.bfloat16)
    run_case(latents, 1152, 2, False, True, True, True, (0, True, False))
    tag = "stem all"
    run_case(image, 768, 16, True, True, True, False, (5, True, True))
    tag = "stem all fp32"
    run_case(image.float(), 768, 16, True, True, True, False, (1, True, True))
    tag = "stem rms"  # RMSNorms before and after the projection and over every row
    run_case(image, 768, 16, True, True, True, False, (1, True, True), RMS_NORM)
    tag = "stem rms one tile"
    run_case(image, 64, 16, True, True, True, False, (1, True, True), RMS_NORM)
    tag = "mae subset"  # MAE pretraining: a quarter of the patches, class token and table
    run_case(image, 1024, 16, False, False, True, True, (1, True, False), kept=49)
    tag = "mae subset, norms"
    run_case(image, 768, 16, True, True, True, False, (1, True, True), kept=49)


def main() -> int:
    print(f"Triton {triton.__version__} from {Path(triton.__file__).resolve().parent.parent}")
    install_recorders()
    if "--tune" in sys.argv[1:]:
        record_tune_variants()
    else:
        record_all()
        record_other_ranks()
        record_stems()
    results, failures = {}, 0
    for variant, kernel, args, kwargs in launches:
        sig, const, attrs, options = specialise(kernel, args, kwargs)
        key = (kernel.fn.__name__, str(sig), str(const), str(attrs), options["num_warps"])
        names = kernel.arg_names
        label = f"[{variant}] " if variant else ""
        label += f"{kernel.fn.__name__} {sig.get('X', sig.get('G'))} " + " ".join(
            f"{names[path[0]]}={value}"
            for path, value in const.items()
            if len(path) == 1 and names[path[0]].isupper() and names[path[0]] != "EMULATE_BF16"
        )
        if key in results:  # the same variant from another case: compiled once
            print(f"{results[key]} {label} (as above)")
            continue
        try:
            compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=TARGET,
                                      options=options)  # fmt: skip
            cubin = compiled.asm["cubin"]
            loops = ",".join(map(str, loop_sizes(cubin)))
            results[key] = f"ok   {resource_usage(cubin)} LOOPS:{loops}"
            print(f"{results[key]} {label} warps={options['num_warps']}")
        except Exception as exc:  # noqa: BLE001 - report every failing variant
            failures += 1
            results[key] = "FAIL"
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:1500]}")
    print(f"{len(results)} kernel variants, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
