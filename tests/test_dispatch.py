"""Backend selection, the ZETA_FUSED_BACKEND override, and import-time guarantees."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import zeta_fused.functional as functional
from zeta_fused import PatchEmbeddings, dispatch


@pytest.fixture
def spy(monkeypatch) -> list[str]:
    """Records which path each module call took."""
    calls: list[str] = []
    real = functional.fused_patch_embed

    def fused(*args, **kwargs):
        calls.append("fused")
        return real(*args, **kwargs)

    monkeypatch.setattr("zeta_fused.module.fused_patch_embed", fused)
    return calls


def test_auto_on_cpu_is_eager(spy, monkeypatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    PatchEmbeddings(3, 8, 16)(torch.randn(1, 3, 8, 8))
    assert spy == []


def test_triton_forced_runs_fused(spy, device) -> None:
    """On the GPU natively, on a CPU-only machine through the interpreter (set by conftest)."""
    m = PatchEmbeddings(3, 8, 16, backend="triton", device=device)
    m(torch.randn(1, 3, 8, 8, device=device))
    assert spy == ["fused"]


def test_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensor.*TRITON_INTERPRET=1.*cpu"):
        PatchEmbeddings(3, 8, 16, backend="triton")(torch.randn(1, 3, 8, 8))


def test_triton_without_triton_installed_raises(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        PatchEmbeddings(3, 8, 16, backend="triton")(torch.randn(1, 3, 8, 8))


def test_env_var_overrides_auto_only(spy, monkeypatch, device) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    x = torch.randn(1, 3, 8, 8, device=device)
    PatchEmbeddings(3, 8, 16, device=device)(x)
    assert spy == ["fused"]
    PatchEmbeddings(3, 8, 16, backend="eager", device=device)(x)
    assert spy == ["fused"]
    monkeypatch.setenv(dispatch.ENV_VAR, "eager")
    PatchEmbeddings(3, 8, 16, device=device)(x)
    assert spy == ["fused"]


def test_env_var_rejects_unknown_value(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="'fast'"):
        PatchEmbeddings(3, 8, 16)(torch.randn(1, 3, 8, 8))


@pytest.mark.gpu
def test_auto_on_cuda_is_fused(spy, monkeypatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    PatchEmbeddings(3, 8, 16, device="cuda")(torch.randn(1, 3, 8, 8, device="cuda"))
    assert spy == ["fused"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")


def test_import_does_not_initialise_cuda_or_import_triton() -> None:
    r = _run(
        "import sys, torch, zeta_fused\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
        "print(zeta_fused.PatchEmbeddings(3, 8, 16)(torch.randn(1, 3, 8, 8)).shape)\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 4, 8])" in r.stdout


def test_works_without_triton() -> None:
    r = _run(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, zeta_fused\n"
        "from zeta_fused import dispatch\n"
        "assert not dispatch.triton_available()\n"
        "print(zeta_fused.PatchEmbeddings(3, 8, 16)(torch.randn(1, 3, 8, 8)).shape)\n"
        "try:\n"
        "    zeta_fused.PatchEmbeddings(3, 8, 16, backend='triton')(torch.randn(1, 3, 8, 8))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 4, 8])" in r.stdout
    assert "needs the triton package" in r.stdout


def test_no_top_level_kernels_module() -> None:
    r = _run("import importlib.util; print(importlib.util.find_spec('kernels'))")
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stdout + r.stderr
    r = _run("import zeta_fused.kernels.patch_embed_fwd")
    assert r.returncode == 0, r.stderr
