"""Every kernel variant the launchers produce compiles for sm_90 (H100/H200), on any machine,
and a representative subset compiles for an A100, an RTX 5090 and an MI300 within their shared
memory per block.

The interpreter never runs Triton's code generator, so type errors in loops, globals that are
not constexpr and similar GPU-only failures would otherwise surface on the first GPU run; and
Triton checks shared memory only when a GPU loads the kernel, so tiles that overflow a card
with less of it than the one they were tuned on (``OutOfResources``) would surface on that
card. Code generation differs between Triton releases, so ``make test`` also installs the GPU
image's release (the one beside its torch 2.11) into the folder ZETA_FUSED_ALT_TRITON names, and
compiles every sm_90 variant with it (the core cases with the venv's release). ``make aot-matrix``
compiles every variant for every architecture with both releases.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import TESTS

SCRIPT = TESTS / "aot_compile.py"
ALT_TRITON = os.environ.get("ZETA_FUSED_ALT_TRITON")
# The other architectures of make test: mma.sync with 163 KiB (sm_80), consumer Blackwell with
# 99 KiB and the tiles fitted to it (sm_120, as sm_86 and sm_89), AMD's 64 KiB of LDS (gfx942).
SUBSET = ("sm_80", "sm_120", "gfx942")


def _behind_the_tests() -> None:
    """A compile's priority, lowered: the tests run in one process, and on a machine with fewer
    cores than compiles + 1 they would otherwise wait for the compiles, which have the whole
    run to finish in."""
    os.nice(10)


def start(env: dict, *args: str) -> subprocess.Popen:
    """tests/aot_compile.py with ``args``, started in the background, its output to temporary
    files (a pipe would fill up and stall it until it is read)."""
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    job = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=out, stderr=err,
                           text=True, env=env, preexec_fn=_behind_the_tests)  # fmt: skip
    job.files = out, err
    return job


def finished(job: subprocess.Popen) -> str:
    """The output of a compile started by :func:`start`, checked: every variant compiled."""
    job.wait()
    out, err = (f.seek(0) or f.read() for f in job.files)
    print(out)  # registers / spills / shared memory per variant, shown with -s or on failure
    assert job.returncode == 0, out[-4000:] + err[-4000:]
    assert re.search(r"\b0 failed$", out.strip()), out[-2000:]
    checked = [line for line in out.splitlines() if line.startswith("ok ")]
    assert checked and all(" SMEM:" in line for line in checked)
    return out


def has_backend(name: str) -> bool:
    return importlib.util.find_spec(f"triton.backends.{name}") is not None


pytestmark = pytest.mark.aot
# The compiles, by name, once started (start_compiles).
_jobs: dict[str, subprocess.Popen] = {}


def start_compiles() -> None:
    """Start every compile of this module, each a process of its own (conftest.py does it when
    the tests are collected, so that they run beside the other tests; these tests run last)."""
    if _jobs or __import__("torch").cuda.is_available():
        return
    env = dict(os.environ)
    if has_backend("nvidia"):
        # Every sm_90 variant with the GPU image's release (the one the GPUs run), the core
        # cases with this one; every variant with this one where the other is not installed.
        core = ("--core",) if ALT_TRITON is not None else ()
        _jobs["sm_90"] = start(env, "--target", "sm_90", *core)
        if ALT_TRITON is not None:
            path = os.pathsep.join([ALT_TRITON, env.get("PYTHONPATH", "")])
            _jobs["alt"] = start(env | {"PYTHONPATH": path}, "--target", "sm_90")
        if has_backend("amd"):
            _jobs["others"] = start(env, *(a for n in SUBSET for a in ("--target", n)), "--core")


def stop_compiles() -> None:
    """Stop the compiles still running (a session that ends before their tests)."""
    for job in _jobs.values():
        if job.poll() is None:
            job.kill()
            job.wait()


@pytest.fixture(scope="module")
def compiles():
    """The compiles started by start_compiles (started here when the tests were not collected
    by this suite's conftest)."""
    if __import__("torch").cuda.is_available():  # minutes of compiles: GPU time is scarce
        pytest.skip("on a GPU the JIT compiles the variants the tests launch")
    start_compiles()
    yield _jobs
    stop_compiles()


def test_kernel_variants_compile_for_hopper(compiles) -> None:
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
