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

import importlib.util
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


def start(env: dict, *args: str) -> subprocess.Popen:
    """tests/aot_compile.py with ``args``, started in the background."""
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip


def finished(job: subprocess.Popen) -> str:
    """The output of a compile started by :func:`start`, checked: every variant compiled."""
    out, err = job.communicate()
    print(out)  # registers / spills / shared memory per variant, shown with -s or on failure
    assert job.returncode == 0, out[-4000:] + err[-4000:]
    assert re.search(r"\b0 failed$", out.strip()), out[-2000:]
    checked = [line for line in out.splitlines() if line.startswith("ok ")]
    assert checked and all(" SMEM:" in line for line in checked)
    return out


def has_backend(name: str) -> bool:
    return importlib.util.find_spec(f"triton.backends.{name}") is not None


@pytest.fixture(scope="module")
def compiles():
    """Every compile of this module, started together when the first of its tests runs: each
    is a process of its own on one core, so that together they take the machine's cores
    (minutes of compiles otherwise one after the other); each test waits for its own."""
    if __import__("torch").cuda.is_available():  # minutes of compiles: GPU time is scarce
        pytest.skip("on a GPU the JIT compiles the variants the tests launch")
    env = dict(os.environ)
    jobs = {}
    if has_backend("nvidia"):
        jobs["sm_90"] = start(env, "--target", "sm_90")
        if ALT_TRITON is not None:
            path = os.pathsep.join([ALT_TRITON, env.get("PYTHONPATH", "")])
            jobs["alt"] = start(env | {"PYTHONPATH": path}, "--target", "sm_90")
        if has_backend("amd"):
            jobs["others"] = start(env, *(a for n in SUBSET for a in ("--target", n)), "--core")
    yield jobs
    for job in jobs.values():
        if job.poll() is None:
            job.kill()
            job.communicate()


def test_all_kernel_variants_compile_for_hopper(compiles) -> None:
    if "sm_90" not in compiles:
        pytest.skip("Triton without its NVIDIA backend")
    out = finished(compiles["sm_90"])
    assert "MMA:wgmma" in out  # Hopper's tensor-core instruction


@pytest.mark.skipif(ALT_TRITON is None, reason="ZETA_FUSED_ALT_TRITON unset (make test sets it)")
def test_all_kernel_variants_compile_with_the_gpu_images_triton(compiles) -> None:
    if "alt" not in compiles:
        pytest.skip("Triton without its NVIDIA backend")
    out = finished(compiles["alt"])
    assert f"from {Path(ALT_TRITON).resolve()}" in out, out[:200]


def test_kernels_fit_other_architectures(compiles) -> None:
    """The core cases under each architecture's own policy: every variant within its shared
    memory and the estimate the policy fits; sm_120 compiles tl.dot to mma.sync (it has no
    wgmma), MI300 to MFMA."""
    if "others" not in compiles:
        pytest.skip("Triton without its NVIDIA and AMD backends")
    out = finished(compiles["others"])
    sections = dict(re.findall(r"^== (\S+): (.*?)(?=^== |\Z)", out, re.M | re.S))
    assert set(sections) == set(SUBSET)
    assert "MMA:mma" in sections["sm_120"] and "MMA:wgmma" not in sections["sm_120"]
    assert "MMA:mfma" in sections["gfx942"]
