"""Backend choice: fused Triton op or the eager PyTorch path.

``backend="auto"`` runs the fused op on CUDA tensors when Triton imports and eager otherwise;
the environment variable ``ZETA_FUSED_BACKEND`` (auto | triton | eager) overrides ``"auto"``.
``"triton"`` forces the fused op: on a CPU tensor only under the Triton interpreter
(``TRITON_INTERPRET=1``), otherwise it raises. Nothing here initialises CUDA or imports Triton at
import time.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "eager")
ENV_VAR = "ZETA_FUSED_BACKEND"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] = None: deliberately hidden
        return False


# Found once at import without importing Triton; a plain constant keeps torch.compile traces
# free of cache wrappers.
_HAS_TRITON = _find_triton()


def triton_available() -> bool:
    """True when Triton is installed."""
    return _HAS_TRITON


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def effective_backend(backend: str) -> str:
    """The backend after applying the ``ZETA_FUSED_BACKEND`` override to ``"auto"``."""
    if backend == "auto":
        return check_backend(os.environ.get(ENV_VAR, "auto") or "auto")
    return backend


def use_fused(backend: str, x: torch.Tensor) -> bool:
    """Whether this call runs the fused Triton op (raises if ``"triton"`` cannot run)."""
    backend = effective_backend(backend)
    if backend == "eager":
        return False
    if backend == "auto":
        return x.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if x.is_cuda or (x.device.type == "cpu" and interpreting()):
        return True
    raise RuntimeError(
        f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); "
        f"got a tensor on {x.device}"
    )
