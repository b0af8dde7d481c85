"""Compile every kernel variant the launchers produce for a GPU architecture, without a GPU.

Run as a script (``python tests/aot_compile.py --target sm_90``) in a process where
TRITON_INTERPRET is unset: the launchers run on CPU tensors under the launch policy of the
target (``zeta_fused.op.devices.for_target``: its grid targets, pipeline depth and the tiles
fitted to its shared memory) with the kernels swapped for recorders, then each recorded launch
is compiled with ``triton.compile`` for that target (ptxas or the AMD backend included), so
code-generation errors that the interpreter cannot see fail here. Targets: the architectures of
``devices.TARGETS`` (sm_80, sm_86, sm_89, sm_90, sm_100, sm_120, gfx942), repeatable, or
``all``; default sm_90.

Prints one line per kernel variant: registers, stack and spills (cuobjdump; AMD: the amdgcn
report), the shared memory Triton reports against the target's per-block limit and against
``devices.smem_estimate`` (the bound the policy fits), the kind of tensor-core instruction, the
SASS instruction count of every innermost loop, and the compile time. Exits non-zero if a
variant fails to compile, needs more shared memory than the target has or than the estimate,
or lacks the divisibility hints a GPU launch would pass. With ``--tune``, compiles the variants
that ``python -m bench.tune`` times instead (its presets, under each alternative), so a GPU run
spends no time on one that cannot compile. ``--json PATH`` writes every variant's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET first"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import zeta_fused.op.launch as launch  # noqa: E402
from zeta_fused.functional import op_inputs  # noqa: E402
from zeta_fused.kernels.contract import LAYER_NORM, RMS_NORM  # noqa: E402
from zeta_fused.op import devices, policy  # noqa: E402
from zeta_fused.op.args import NO_STEM, BwdArgs, Norm, Stem  # noqa: E402

KERNELS = [
    "_patch_embed_fwd_kernel",
    "_finish_rows_kernel",
    "_fold_weight_kernel",
    "_bwd_dz_kernel",
    "_bwd_dw_kernel",
    "_bwd_dx_kernel",
    "_segment_sum_kernel",
]
launches: list[tuple] = []
tag = ""  # the case or bench.tune variant being recorded
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def gpu_target(name: str) -> GPUTarget:
    """Triton's target of a devices.TARGETS architecture ("sm_90" -> cuda 90, "gfx942")."""
    if name.startswith("gfx"):
        return GPUTarget("hip", name, 64)
    return GPUTarget("cuda", int(name.removeprefix("sm_")), 32)


class Recorder:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((tag, self.kernel, args, kwargs))


def specialise(kernel, args, kwargs, target: GPUTarget) -> tuple[dict, dict, dict, dict]:
    """Signature, constants, attributes and options exactly as the JIT derives them from real
    arguments (Triton's own binder: an int equal to 1 becomes a constant, ints and pointers
    divisible by 16 get a divisibility hint, None and tuples as a launch passes them), so the
    compiled code is the code a GPU launch would compile: without the hints the loads are not
    vectorised, no asynchronous copies are emitted and their shared memory is missed."""
    backend = make_backend(target)
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
    # (cuobjdump's SHARED is the static part only: the tiles are dynamic, see SMEM)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return "REG:{} STACK:{} LOCAL:{}".format(*m.groups()) if m else "usage: n/a"


class Loop(NamedTuple):
    """An innermost loop of the SASS and what one iteration issues."""

    size: int  # instructions
    mma: int  # tensor-core instructions (HGMMA, HMMA)
    rs: int  # wgmma with A from registers (HGMMA whose first source is not a descriptor)
    ldg: int  # plain global loads into registers
    async_copies: int  # cp.async (LDGSTS) and TMA (UTMALDG) copies to shared memory
    waits: tuple[int, ...]  # the pending counts of the wgmma waits (WARPGROUP.DEPBAR.LE)
    local: int  # local-memory loads and stores (spills)


def sass_loops(cubin: bytes) -> list[Loop]:
    """The innermost loops of the SASS, in address order. A loop is a backward branch and the
    instructions from its target to it; innermost: it contains no other loop."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    code = [(int(a, 16), op.strip()) for a, op in lines]
    loops = []
    for addr, op in code:
        m = re.search(r"\bBRA\S*\s+(?:[^;]*?,\s*)?0x([0-9a-f]+)\s*$", op)
        if m and int(m.group(1), 16) < addr:  # backward (a branch to itself: the idle tail)
            loops.append((int(m.group(1), 16), addr))
    inner = [
        (s, e)
        for s, e in loops
        if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)
    ]
    out = []
    for start, end in sorted(inner):
        body = [re.sub(r"^@!?U?P\w+\s+", "", op) for a, op in code if start <= a <= end]
        name = [op.split()[0] if op else "" for op in body]
        hgmma = [op for op in body if op.startswith("HGMMA")]
        out.append(Loop(
            size=len(body),
            mma=sum(n.startswith(("HGMMA", "HMMA")) for n in name),
            rs=sum("gdesc" not in op.split(",")[1] for op in hgmma),
            ldg=sum(n.startswith("LDG.") or n == "LDG" for n in name),
            async_copies=sum(n.startswith(("LDGSTS", "UTMALDG")) for n in name),
            waits=tuple(int(m, 16) for op in body
                        for m in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", op)),
            local=sum(n.startswith(("LDL", "STL")) for n in name),
        ))  # fmt: skip
    return out


def fast_loop_problems(loops: list[Loop], shifted_loops: int, waiting_loops: int = 0) -> list[str]:
    """What keeps a main loop whose operands reach the tensor cores as stored from a pipelined
    Hopper GEMM loop (docs/design.md, "Forward main loop", "Backward"): both operands by
    asynchronous copies into shared memory (no plain global load, wgmma reading both from
    there: SS), the products left in flight across iterations (every wait with pendings >= 1),
    no spills. At most ``shifted_loops`` main loops may take the shifted operand in registers
    (RS: the forward's fallback of nearly constant rows), and at most ``waiting_loops`` SS ones
    may wait for every wgmma (the dW GEMM's second loop, over the tokens its fold leaves out,
    which stages an operand made in registers)."""
    main = [lp for lp in loops if lp.mma]
    fast = [lp for lp in main if lp.rs == 0]
    problems = []
    if main and not fast:  # (one K step, K <= BLOCK_K: no loop to pipeline)
        problems.append("no main loop reads both operands from shared memory (SS wgmma)")
    if len(main) - len(fast) > shifted_loops:
        problems.append(f"{len(main) - len(fast)} main loops take A from registers (RS wgmma)")
    waiting = [lp for lp in fast if not lp.waits or min(lp.waits) < 1]
    if len(waiting) > waiting_loops:
        problems.append(f"{len(waiting)} main loops wait for every wgmma "
                        f"(pendings {[lp.waits for lp in waiting]})")  # fmt: skip
    for lp in fast:
        if lp.ldg or lp.async_copies < 2:
            problems.append(f"main loop: {lp.ldg} plain global loads, {lp.async_copies} async")
        if lp.local:
            problems.append(f"main loop spills ({lp.local} local loads and stores)")
    return problems


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


# (dtype, D, patch, pre, post, bias, conv): D 64 fits one tile, wider rows take the second
# pass; patch 14 (vit_l14, K = 588) gives other compile-time index arithmetic; a Conv2d weight
# (timm, transformers) puts the kernels that read it in the (c, i, j) K order.
CASES = [
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
# make test's representative subset for the targets other than sm_90: the cases with the widest
# tiles of each table (vit_b16 in bf16, fp32, fp64: its image-gradient tiles take the most shared
# memory on mma.sync parts), autocast's fp32 operand tiles and the whole stem with every norm;
# the other cases change index arithmetic or take smaller tiles (batch 1), not wider ones.
CORE_CASES = (0, 7, 9)
CORE_STEMS = ("stem vit autocast", "stem all", "stem rms", "mae subset, norms")


def record_all(core: bool = False) -> None:
    """The cases above (``core``: CORE_CASES only) and the autocast one."""
    global tag
    for i, (dtype, dim, patch, pre, post, bias, conv) in enumerate(CASES):
        if core and i not in CORE_CASES:
            continue
        # A batch whose forward takes the wide tiles (more row blocks than small_grid) and
        # several token splits in the dW GEMM, as on a real run; the first case also runs at
        # batches 8 and 1, where the forward splits small tiles' columns across programs.
        for batch in (32, 8, 1) if i == 0 and not core else (32,):
            tag = f"case {i} b{batch}"
            x = torch.empty(batch, 3, 224, 224, dtype=dtype)
            run_case(x, dim, patch, pre, post, bias, conv)
    # CUDA autocast: fp32 tensors, bf16 GEMM, an fp32 output after the post-norm. The kernels
    # load fp32 weight tiles, whose pipeline takes twice the shared memory of bf16 ones.
    tag = "autocast"
    run_case(torch.empty(32, 3, 224, 224), 768, 16, True, True, True, False, autocast=True)


def run_case(x, dim, patch, pre, post, bias, conv, stem=None, kind=LAYER_NORM, kept=None,
             autocast=False) -> None:  # fmt: skip
    """Forward and backward launches for input x and a patch (an int: square) of its rank;
    ``stem``: (prefix rows, position table, stem norm) of a whole-stem case; ``kind``: the
    norms' kind; ``kept``: the patches each image embeds (a keep index), None: all;
    ``autocast``: the GEMM in bf16 on these tensors, with the output dtype CUDA autocast gives
    (functional.fused_dtypes)."""
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
    if autocast:
        norm_out = post or (stem is not None and stem[2])
        added = parts.pos is not None or parts.prefix is not None
        out = torch.float32 if norm_out or added else torch.bfloat16
        args = args._replace(compute_dtype=torch.bfloat16, out_dtype=out)
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


def record_stems(core: bool = False) -> None:
    """Whole stems (prefix rows, position table, stem norm) as the benchmark's presets run them:
    timm ViT-B/16 (class token + pos; under autocast its fp32 table makes dY and the dW GEMM's
    tiles fp32), CLIP ViT-L/14 (no-bias conv, ln_pre), DiT-XL/2 (affine-free post-norm + pos on
    latents), and every norm over D at once in bf16 and fp32 (the dZ kernel's middle pass).
    ``core``: CORE_STEMS only."""
    global tag
    image = torch.empty(32, 3, 224, 224, dtype=torch.bfloat16)
    latents = torch.empty(32, 4, 32, 32, dtype=torch.bfloat16)
    stems = {
        "stem vit": lambda: run_case(image, 768, 16, False, False, True, True, (1, True, False)),
        "stem vit autocast": lambda: run_case(image.float(), 768, 16, False, False, True, True,
                                              (1, True, False), autocast=True),
        "stem clip": lambda: run_case(image, 1024, 14, False, False, False, True, (1, True, True)),
        "stem dit": lambda: run_case(latents, 1152, 2, False, True, True, True, (0, True, False)),
        "stem all": lambda: run_case(image, 768, 16, True, True, True, False, (5, True, True)),
        "stem all fp32": lambda: run_case(image.float(), 768, 16, True, True, True, False,
                                          (1, True, True)),
        # RMSNorms before and after the projection and over every row.
        "stem rms": lambda: run_case(image, 768, 16, True, True, True, False, (1, True, True),
                                     RMS_NORM),
        "stem rms one tile": lambda: run_case(image, 64, 16, True, True, True, False,
                                              (1, True, True), RMS_NORM),
        # MAE pretraining: a quarter of the patches, class token and table (keep index).
        "mae subset": lambda: run_case(image, 1024, 16, False, False, True, True,
                                       (1, True, False), kept=49),
        "mae subset, norms": lambda: run_case(image, 768, 16, True, True, True, False,
                                              (1, True, True), kept=49),
    }  # fmt: skip
    for name, record in stems.items():
        if not core or name in CORE_STEMS:
            tag = name
            record()


def compile_target(name: str, cases: str, records: list[dict],
                   kernels: list[str] | None = None) -> int:  # fmt: skip
    """Record the launches under ``name``'s policy, compile each variant for it (``kernels``:
    only theirs), print and check its figures; returns the number of failures."""
    target, limit = gpu_target(name), devices.TARGETS[name].smem_per_block
    launches.clear()
    with policy.override(base=devices.for_target(name)):
        if cases == "tune":
            record_tune_variants()
        else:
            record_all(core=cases == "core")
            if cases == "all":
                record_other_ranks()
            record_stems(core=cases == "core")
    print(f"== {name}: shared memory per block {limit} bytes; {len(launches)} launches")
    results, failures = {}, 0
    for variant, kernel, args, kwargs in launches:
        if kernels and kernel.fn.__name__ not in kernels:
            continue
        sig, const, attrs, options = specialise(kernel, args, kwargs, target)
        key = (kernel.fn.__name__, str(sig), str(const), str(attrs), options["num_warps"],
               options["num_stages"])  # fmt: skip
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
        record = {"target": name, "triton": triton.__version__, "case": variant,
                  "kernel": kernel.fn.__name__, "label": label, "limit": limit,
                  "warps": options["num_warps"], "stages": options["num_stages"]}  # fmt: skip
        problems = []
        if not any("tt.divisibility" in str(hints) for hints in attrs.values()):
            problems.append("no divisibility hints: not what a GPU launch compiles")
        try:
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=target,
                                      options=options)  # fmt: skip
            record["compile_s"] = round(time.perf_counter() - start, 3)
            shared = record["shared"] = compiled.metadata.shared
            bound = estimate(kernel.fn.__name__, sig, const, names, name, options["num_stages"])
            record["estimate"] = bound
            if shared > limit:
                problems.append(f"needs {shared} bytes of shared memory, {name} has {limit}")
            problems += main_loop_problems(kernel.fn.__name__, sig, const, names, target,
                                           compiled)  # fmt: skip
            if bound is not None and shared > bound:
                problems.append(f"needs {shared} bytes of shared memory, estimated {bound}")
            figures = f"{machine_code(compiled, target)} SMEM:{shared}/{limit}"
            figures += "" if bound is None else f" EST:{bound}"
            results[key] = f"{'FAIL' if problems else 'ok  '} {figures}"
            print(f"{results[key]} {label} warps={options['num_warps']} "
                  f"stages={options['num_stages']} {record['compile_s']:.2f}s")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - report every failing variant
            problems.append(f"{type(exc).__name__}: {str(exc)[:1500]}")
            results[key] = "FAIL"
        if problems:
            failures += 1
            print(f"FAIL {label}: " + "; ".join(problems))
        record["problems"] = problems
        records.append(record)
    print(f"{name}: {len(results)} kernel variants, {failures} failed")
    return failures


def main_loop_problems(kernel: str, sig: dict, const: dict, names: list[str],
                       target: GPUTarget, compiled) -> list[str]:  # fmt: skip
    """fast_loop_problems on sm_90 of the main loops that take the operands as stored: the
    forward's where the patches are exact in the operand dtype (16-bit images of the operand's
    dtype, which take the raw tile), the folded dW GEMM's (FOLD)."""
    if target.backend != "cuda" or target.arch != 90:
        return []
    consts = {names[p[0]]: v for p, v in const.items() if len(p) == 1}
    if kernel == "_bwd_dw_kernel" and consts["FOLD"]:
        return fast_loop_problems(sass_loops(compiled.asm["cubin"]), 0, int(consts["CENTRED"]))
    if kernel != "_patch_embed_fwd_kernel":
        return []
    operand = str(consts["COMPUTE_DTYPE"]).removeprefix("tl.")
    if sig["X"].lstrip("*") != operand or operand not in ("bf16", "fp16") or consts["SHIFT"]:
        return []
    shifted = 2 if consts["NORM1"] == LAYER_NORM else 0  # the fallback's two loops
    return fast_loop_problems(sass_loops(compiled.asm["cubin"]), shifted)


def estimate(kernel: str, sig: dict, const: dict, names: list[str], arch: str,
             stages: int) -> int | None:  # fmt: skip
    """devices.smem_estimate of a GEMM kernel's launch (None for the others), from its BLOCK_*
    constexprs and the dtypes of its arguments."""
    if kernel not in devices.KERNEL_TILES:
        return None
    blocks = {names[p[0]]: v for p, v in const.items() if len(p) == 1}
    loaded = {
        arg: DTYPE_BYTES[sig[arg].lstrip("*")] if sig.get(arg, "").startswith("*") else 0
        for arg in ("X", "W", "DZ")
    }
    compute = DTYPE_BYTES[str(blocks["COMPUTE_DTYPE"]).removeprefix("tl.")]
    acc = DTYPE_BYTES[str(blocks["ACC_DTYPE"]).removeprefix("tl.")]
    return devices.smem_estimate(kernel, blocks, loaded, compute, acc, arch, stages)


def machine_code(compiled, target: GPUTarget) -> str:
    """Registers, stack and spills, the tensor-core instruction and the innermost loops."""
    if target.backend == "hip":
        amdgcn = compiled.asm["amdgcn"]
        report = dict(re.findall(r"; (TotalNumVgprs|NumSgprs|ScratchSize): (\d+)", amdgcn))
        mma = "mfma" if "v_mfma" in amdgcn else "none"
        return (f"VGPR:{report.get('TotalNumVgprs')} SGPR:{report.get('NumSgprs')} "
                f"SCRATCH:{report.get('ScratchSize')} MMA:{mma}")  # fmt: skip
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    kinds = ("tcgen05.mma", "wgmma.mma_async", "mma.sync", "fma.rn.f64")
    mma = next((k.split(".")[0] for k in kinds if k in ptx), "none")
    sizes = ",".join(str(lp.size) for lp in sass_loops(cubin))
    return f"{resource_usage(cubin)} MMA:{mma} LOOPS:{sizes}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--target",
        action="append",
        help=f"{', '.join(devices.TARGETS)} or all (repeatable; default sm_90)",
    )
    ap.add_argument("--tune", action="store_true", help="the variants bench.tune times")
    ap.add_argument(
        "--core",
        action="store_true",
        help="the representative subset of cases (make test's other targets)",
    )
    ap.add_argument("--json", type=Path, help="write every variant's figures there")
    ap.add_argument(
        "--kernel",
        action="append",
        choices=KERNELS,
        help="compile only this kernel's variants (repeatable; default all)",
    )
    args = ap.parse_args(argv)  # fmt: skip
    names = args.target or ["sm_90"]
    names = list(devices.TARGETS) if "all" in names else names
    unknown = [n for n in names if n not in devices.TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}: choose from {', '.join(devices.TARGETS)}, all")
    print(f"Triton {triton.__version__} from {Path(triton.__file__).resolve().parent.parent}")
    install_recorders()
    records: list[dict] = []
    cases = "tune" if args.tune else "core" if args.core else "all"
    failures = sum(compile_target(n, cases, records, args.kernel) for n in names)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(f"{len(records)} kernel variants on {len(names)} target(s), {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
