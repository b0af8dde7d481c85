"""Backend selection, the ZETA_FUSED_BACKEND override, and import-time guarantees."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import zeta_fused.functional as functional
from zeta_fused import PatchEmbeddings, dispatch, patch_embed


@pytest.fixture
def spy(monkeypatch) -> list[str]:
    """Records which path each module call took."""
    calls: list[str] = []
    real = functional.fused_patch_embed

    def fused(*args, **kwargs):
        calls.append("fused")
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "fused_patch_embed", fused)
    return calls


@pytest.fixture
def env_backend(monkeypatch):
    """Sets ZETA_FUSED_BACKEND (None: unset) as if before the process's first call, which is
    when it is read."""

    def set_to(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(dispatch.ENV_VAR, value)
        monkeypatch.setattr(dispatch, "_env_choice", dispatch._UNTRIED)

    return set_to


def test_auto_on_cpu_is_eager(spy, env_backend) -> None:
    env_backend(None)
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


@pytest.mark.parametrize(
    "triton_version, numpy_version, fails",
    [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False)],
)
def test_an_interpreter_that_cannot_run_raises_naming_the_versions(
    monkeypatch, triton_version, numpy_version, fails
) -> None:
    """Triton 3.6's interpreter with numpy 2.4 fails inside every kernel: the call says why
    instead, before anything runs."""
    import numpy
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    dispatch.interpreter_problem.cache_clear()
    try:
        problem = dispatch.interpreter_problem()
        assert (problem is not None) == fails, problem
        if fails:
            with pytest.raises(
                RuntimeError, match=f"Triton {triton_version}.*numpy {numpy_version}"
            ):
                PatchEmbeddings(3, 8, 16, backend="triton")(torch.randn(1, 3, 8, 8))
    finally:
        dispatch.interpreter_problem.cache_clear()


def test_triton_without_triton_installed_raises(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "the triton package is gone")
    with pytest.raises(RuntimeError, match="needs Triton, but the triton package is gone"):
        PatchEmbeddings(3, 8, 16, backend="triton")(torch.randn(1, 3, 8, 8))


def test_env_var_overrides_auto_only(spy, env_backend, device) -> None:
    env_backend("triton")
    x = torch.randn(1, 3, 8, 8, device=device)
    PatchEmbeddings(3, 8, 16, device=device)(x)
    assert spy == ["fused"]
    PatchEmbeddings(3, 8, 16, backend="eager", device=device)(x)
    assert spy == ["fused"]
    env_backend("eager")
    PatchEmbeddings(3, 8, 16, device=device)(x)
    assert spy == ["fused"]


def test_env_var_is_read_once(spy, env_backend, monkeypatch, device) -> None:
    env_backend("eager")
    m = PatchEmbeddings(3, 8, 16, device=device)
    x = torch.randn(1, 3, 8, 8, device=device)
    m(x)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # after the first call: no effect
    m(x)
    assert spy == []


def test_env_var_unknown_value_is_reported_once_and_ignored(env_backend, spy) -> None:
    """A value that is not a backend names the variable in one warning, then counts as unset
    (on CPU: eager), instead of failing every forward."""
    env_backend("fastest")
    m = PatchEmbeddings(3, 8, 16)
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"ZETA_FUSED_BACKEND='fastest' is not one of"):
        m(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(m(x), m.embedding[3](m.embedding[2](m.embedding[1](
            m.embedding[0](x)))))  # fmt: skip
    assert spy == []


@pytest.mark.gpu
def test_auto_on_cuda_is_fused(spy, env_backend) -> None:
    env_backend(None)
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
    assert "needs Triton, but the triton package is not installed" in r.stdout


BROKEN_TRITON = """
import sys, warnings, torch
sys.path.insert(0, sys.argv[1])  # a 'triton' package whose import fails
import zeta_fused
from zeta_fused import dispatch
x = torch.randn(1, 3, 8, 8)
assert not dispatch.triton_available()
assert "failed to import (ImportError: broken build)" in dispatch.triton_import_error()
try:
    zeta_fused.PatchEmbeddings(3, 8, 16, backend="triton")(x)
except RuntimeError as e:
    print("triton:", e)
# "auto" on a CUDA tensor falls back to eager with one warning; emulate CUDA with a flag.
class FakeCuda:
    is_cuda = True
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    assert dispatch.use_fused("auto", FakeCuda()) is False
    assert dispatch.use_fused("auto", FakeCuda()) is False
print("warnings:", [str(w.message) for w in seen])
"""


def test_triton_that_fails_to_import_means_eager(tmp_path) -> None:
    """Triton installed but broken: "auto" runs eager (and says so once), "triton" raises with
    the import error, instead of "auto" raising on the first fused call."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('broken build')\n")
    r = subprocess.run(
        [sys.executable, "-c", BROKEN_TRITON, str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "triton: backend='triton' needs Triton, but the triton package failed" in r.stdout
    assert r.stdout.count("zeta_fused runs eager on CUDA") == 1, r.stdout


def test_numpy_integers_are_integers() -> None:
    np = pytest.importorskip("numpy")
    m = PatchEmbeddings(np.int64(3), np.int64(8), patch_size=np.int64(4))
    assert m.patch_size == (4, 4) and m(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8)
    assert PatchEmbeddings(3, 8, np.int32(16)).patch_size == (4, 4)
    with pytest.raises(TypeError, match="patch_size must be an integer, got 4.0"):
        PatchEmbeddings(3, 8, patch_size=4.0)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_functional_patch_size_of_any_integral_type(backend, device) -> None:
    """patch_embed takes a numpy or 0-d tensor integer as the size along every dimension, as
    F.conv2d takes its kernel size."""
    np = pytest.importorskip("numpy")
    on = "cpu" if backend == "eager" else device
    x, w = torch.randn(1, 3, 8, 8, device=on), torch.randn(8, 48, device=on)
    want = patch_embed(x, 4, w, backend=backend)
    for size in (np.int64(4), np.int32(4), torch.tensor(4)):
        torch.testing.assert_close(patch_embed(x, size, w, backend=backend), want)
    with pytest.raises(TypeError, match="patch_size must be an integer, got 4.0"):
        patch_embed(x, 4.0, w, backend=backend)
