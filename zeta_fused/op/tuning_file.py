"""The disk file of tuning's choices (docs/design.md, "Tuning"): what a file is valid for (GPU
name, driver, torch, Triton and zeta-fused version), where it lives and how it is read; the
table of choices and the writing stay in :mod:`.tuning`."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

CACHE_ENV = "ZETA_FUSED_CACHE_DIR"
FILE_FORMAT = 1


def driver_version() -> str:
    """The GPU driver's version: the NVIDIA kernel module's, else the CUDA driver API's, else
    the amdgpu module's; "unknown" where none can be read."""
    for path in ("/proc/driver/nvidia/version", "/sys/module/amdgpu/version"):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        m = re.search(r"Kernel Module(?: for \S+)?\s+([\d.]+)", text) or re.search(r"\S+", text)
        if m:
            return m.group(1) if m.groups() else m.group(0)
    try:
        import ctypes

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-{version.value}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def device_name(x: Tensor) -> str:
    return _gpu_name(x.get_device()) if x.is_cuda else "cpu-interpreter"


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def identity(name: str) -> dict:
    """What a disk file of choices is valid for."""
    import triton

    from .. import __version__

    return {
        "gpu": name,
        "driver": driver_version() if name != "cpu-interpreter" else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "zeta_fused": __version__,
    }


def cache_dir() -> Path:
    """``ZETA_FUSED_CACHE_DIR``, else ``$XDG_CACHE_HOME/zeta_fused`` (``~/.cache/zeta_fused``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zeta_fused"


def cache_file(ident: dict) -> Path:
    """One file per GPU name, driver, torch, Triton and zeta-fused version."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", ident["gpu"]).strip("-")
    return cache_dir() / f"tuning-{slug}-{digest}.json"


def read_choices(path: Path, ident: dict) -> dict | None:
    """The disk file of ``ident`` as :func:`.tuning._save` writes it; None where it is missing, not
    JSON, or not an object of this format and identity with an object of choices."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    header = isinstance(doc, dict) and (doc.get("format"), doc.get("identity"))
    return doc if header == (FILE_FORMAT, ident) and isinstance(doc["choices"], dict) else None
