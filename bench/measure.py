"""Timing, peak memory and the roofline, measured on the machine the benchmark runs on."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .presets import DTYPES

# Timing quantiles reported: median and the 20th / 80th percentiles.
QUANTILES = [0.5, 0.2, 0.8]
# CPU timing (no events, no L2 flush): a few warm-up calls, then the median of repeated calls.
CPU_WARMUP, CPU_REPEATS = 2, 7
# Copy-bandwidth probe: 1 GiB per direction is far beyond any L2, so it streams from HBM.
COPY_BYTES = 1 << 30
# GEMM-throughput probe: a square GEMM this large runs at the tensor cores' sustained peak.
GEMM_SIZE = 8192


def time_ms(step: Callable[[], object], device: str) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one call of ``step``."""
    if device == "cuda":
        from triton.testing import do_bench

        # L2 flushed before each call. Several quantiles come back as a list (one alone would
        # come back as a bare float).
        return tuple(do_bench(step, quantiles=QUANTILES))
    for _ in range(CPU_WARMUP):
        step()
    samples = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        step()
        samples.append(1e3 * (time.perf_counter() - start))
    q = statistics.quantiles(samples, n=5)
    return statistics.median(samples), q[0], q[3]


def peak_extra_mib(step: Callable[[], object], device: str) -> float | None:
    """Peak memory a call allocates beyond what was already allocated (CUDA only)."""
    if device != "cuda":
        return None
    step()  # warm: workspaces, autotuning, lazily created gradients
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_copy_tbps(device: str = "cuda", nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth in TB/s (read + write bytes per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)[0]
    return 2 * nbytes / (ms * 1e-3) / 1e12


def peak_gemm_tflops(dtype: str, device: str = "cuda", size: int = GEMM_SIZE) -> float:
    """Dense GEMM throughput of this GPU in ``dtype`` (under torch's current fp32 precision)."""
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    b = torch.randn_like(a)
    ms = time_ms(lambda: torch.mm(a, b), device)[0]
    return 2 * size**3 / (ms * 1e-3) / 1e12


def device_info(device: str) -> dict:
    import platform

    import triton

    import zeta_fused

    info = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "zeta_fused": zeta_fused.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count)
        try:
            import subprocess

            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["driver"] = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


# Host-overhead probe: enough back-to-back calls to average out timer resolution.
HOST_CALLS = 500


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_us(fn: Callable[[], object], device: str = "cuda", calls: int = HOST_CALLS) -> float:
    """Host (Python + launch) microseconds per call, calls issued back to back."""
    for _ in range(10):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _sync(device)
    return 1e6 * elapsed / calls
