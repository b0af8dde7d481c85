"""Every kernel variant the launchers produce compiles for sm_90 (H100/H200), on any machine,
and a representative subset compiles for an A100, an RTX 5090 and an MI300 within their shared
memory per block.

The interpreter never runs Triton's code generator, so type errors in loops, globals that are
not constexpr and similar GPU-only failures would otherwise surface on the first GPU run; and
Triton checks shared memory only when a GPU loads the kernel, so tiles that overflow a card
with less of it than the one they were tuned on (``OutOfResources``) would surface on that
card. Code generation differs between Triton releases, so ``make test`` also installs the GPU
image's release (the one beside its torch 2.11) into the folder ZETA_FUSED_ALT_TRITON names, and
the sm_90 variants are compiled with that release as well. ``make aot-matrix`` compiles every
variant for every architecture with both releases.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile.py")
ALT_TRITON = os.environ.get("ZETA_FUSED_ALT_TRITON")
# The other architectures of make test: mma.sync with 163 KiB (sm_80), consumer Blackwell with
# 99 KiB and the tiles fitted to it (sm_120, as sm_86 and sm_89), AMD's 64 KiB of LDS (gfx942).
SUBSET = ("sm_80", "sm_120", "gfx942")


def compile_all(env: dict, *args: str) -> str:
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env
    )
    print(r.stdout)  # registers / spills / shared memory per variant, shown with -s or on failure
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert re.search(r"\b0 failed$", r.stdout.strip()), r.stdout[-2000:]
    checked = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert checked and all(" SMEM:" in line for line in checked)
    return r.stdout


def test_all_kernel_variants_compile_for_hopper() -> None:
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    if __import__("torch").cuda.is_available():  # minutes of compiles: GPU time is scarce
        pytest.skip("on a GPU the JIT compiles the variants the tests launch")
    out = compile_all(dict(os.environ), "--target", "sm_90")
    assert "MMA:wgmma" in out  # Hopper's tensor-core instruction


@pytest.mark.skipif(ALT_TRITON is None, reason="ZETA_FUSED_ALT_TRITON unset (make test sets it)")
def test_all_kernel_variants_compile_with_the_gpu_images_triton() -> None:
    path = os.pathsep.join([ALT_TRITON, os.environ.get("PYTHONPATH", "")])
    out = compile_all(os.environ | {"PYTHONPATH": path}, "--target", "sm_90")
    assert f"from {Path(ALT_TRITON).resolve()}" in out, out[:200]


def test_kernels_fit_other_architectures() -> None:
    """The core cases under each architecture's own policy: every variant within its shared
    memory and the estimate the policy fits; sm_120 compiles tl.dot to mma.sync (it has no
    wgmma), MI300 to MFMA."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    pytest.importorskip("triton.backends.amd", reason="Triton without its AMD backend")
    if __import__("torch").cuda.is_available():
        pytest.skip("on a GPU the JIT compiles the variants the tests launch")
    args = [a for name in SUBSET for a in ("--target", name)]
    out = compile_all(dict(os.environ), *args, "--core")
    sections = dict(re.findall(r"^== (\S+): (.*?)(?=^== |\Z)", out, re.M | re.S))
    assert set(sections) == set(SUBSET)
    assert "MMA:mma" in sections["sm_120"] and "MMA:wgmma" not in sections["sm_120"]
    assert "MMA:mfma" in sections["gfx942"]
