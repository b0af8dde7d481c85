"""Test harness: the Triton interpreter on machines without CUDA, poisoned allocations, and the
gpu marker."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Read when @triton.jit decorates, so it must be set before any kernel module is imported.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        # cuDNN runs fp32 convolutions in TF32 by default, matmuls run IEEE fp32 (torch's
        # default, which the fused kernels follow): the peers' conv stems (timm, SAM, OpenCLIP)
        # would differ from the fused path by TF32's rounding, which no comparison should measure.
        torch.backends.cudnn.allow_tf32 = False
    # Poison: with deterministic algorithms on, torch fills every uninitialised allocation
    # (torch.empty, new_empty, empty_like) with NaN, so an output element a kernel fails to
    # write fails the test instead of passing with whatever an earlier tensor left in that
    # memory (the caching allocator hands the same blocks back, often holding the eager
    # result just compared against). warn_only: ops without a deterministic version only warn.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers", "aot: compiles every kernel variant for GPU targets (minutes; -m 'not aot')"
    )


_AOT_MODULE = pytest.StashKey()


# trylast: after -m and -k have deselected items, so that a run without aot tests compiles nothing.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    # The machine-code compiles (minutes of CPU, processes of their own) start now and run
    # beside the other tests; their tests go last and collect the results.
    aot = [item for item in items if "aot" in item.keywords]
    if aot and not config.option.collectonly:
        items[:] = [item for item in items if "aot" not in item.keywords] + aot
        aot[0].module.start_compiles()
        config.stash[_AOT_MODULE] = aot[0].module


def pytest_sessionfinish(session: pytest.Session) -> None:
    module = session.config.stash.get(_AOT_MODULE, None)
    if module is not None:
        module.stop_compiles()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where fused kernels run: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fused_path_calls(monkeypatch) -> list[int]:
    """Counts the calls that take the fused path (modules, converted peers, functional API: all
    reach the op through functional.fused_patch_embed), so that a case meant to stay fused
    cannot silently run eager, and the reverse."""
    import zeta_fused.functional as functional

    calls: list[int] = []
    real = functional.fused_patch_embed
    monkeypatch.setattr(functional, "fused_patch_embed", lambda a: calls.append(1) or real(a))
    return calls


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Counts the fused op's calls with autograd on (through the custom op when traced or
    under a dispatch mode, else its autograd.Function, or the implementation directly when
    nothing needs a gradient), so a silent eager fallback cannot pass."""
    import zeta_fused.functional as functional

    calls: list[int] = []
    for name in ("patch_embed_fwd", "patch_embed_autograd", "fwd_impl"):
        real = getattr(functional, name)

        def counting(*args, real=real):
            if torch.is_grad_enabled():
                calls.append(1)
            return real(*args)

        monkeypatch.setattr(functional, name, counting)
    return calls


@pytest.fixture
def norm_calls(monkeypatch) -> list[int]:
    """Counts eager layer norms (a norm a fused stem applied, such as timm's norm_pre, is not
    run again)."""
    calls: list[int] = []
    real = torch.nn.functional.layer_norm
    monkeypatch.setattr(
        torch.nn.functional, "layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    return calls
