"""Timing, peak memory and the roofline, measured on the machine the benchmark runs on."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from .presets import DTYPES

# Timing quantiles reported: median and the 20th / 80th percentiles.
QUANTILES = [0.5, 0.2, 0.8]
# CPU timing (no events, no L2 flush) on a machine that other work may keep busy. One intra-op
# thread: a parallel region waits for whichever of its threads the scheduler has descheduled,
# so a call would take a whole time slice (tens of milliseconds instead of one) now and then,
# and the medians of two runs would disagree by an order of magnitude. With one thread every
# op runs on the calling thread, whose CPU time is the clock: time spent waiting for a core
# does not count. Then warm-up and repeated calls, the garbage collector off, in rounds until
# the p80 / p20 spread is small or the cell's time (wall clock) is up.
CPU_THREADS = 1
CPU_WARMUP_S, CPU_MIN_CALLS = 0.05, 3
CPU_ROUND_S, CPU_ROUND_CALLS, CPU_MAX_S = 0.1, 10, 2.0
CPU_MAX_SPREAD = 1.2
# Copy-bandwidth probe: 1 GiB per direction is far beyond any L2, so it streams from HBM.
COPY_BYTES = 1 << 30
# GEMM-throughput probe: a square GEMM this large runs at the tensor cores' sustained peak.
GEMM_SIZE = 8192


def time_ms(step: Callable[[], object], device: str) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one call of ``step`` (on a CPU: of the calling
    thread's CPU time)."""
    if device == "cuda":
        from triton.testing import do_bench

        # L2 flushed before each call. Several quantiles come back as a list (one alone would
        # come back as a bare float).
        return tuple(do_bench(step, quantiles=QUANTILES))
    with _cpu_timing():
        _run_for(step, CPU_WARMUP_S, CPU_MIN_CALLS)
        samples: list[float] = []
        deadline = time.perf_counter() + CPU_MAX_S
        while True:
            samples += _run_for(step, CPU_ROUND_S, CPU_ROUND_CALLS)
            median, p20, p80 = _quantiles(samples)
            if p80 <= CPU_MAX_SPREAD * p20 or time.perf_counter() > deadline:
                return median, p20, p80


def _run_for(step: Callable[[], object], seconds: float, at_least: int) -> list[float]:
    """CPU milliseconds of each call of ``step`` on this thread, called for ``seconds`` (wall
    clock) and ``at_least`` times."""
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while len(samples) < at_least or time.perf_counter() < end:
        start = time.thread_time()
        step()
        samples.append(1e3 * (time.thread_time() - start))
    return samples


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=5)
    return statistics.median(samples), q[0], q[3]


@contextlib.contextmanager
def _cpu_timing() -> Iterator[None]:
    """CPU_THREADS intra-op threads and no garbage collection, both restored after."""
    threads, collecting = torch.get_num_threads(), gc.isenabled()
    torch.set_num_threads(CPU_THREADS)
    gc.disable()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()


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


def copy_ms(nbytes: int, device: str = "cuda") -> float:
    """Median milliseconds of a device-to-device copy of ``nbytes`` bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device)[0]


def peak_copy_tbps(device: str = "cuda", nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth in TB/s (read + write bytes per second)."""
    return 2 * nbytes / (copy_ms(nbytes, device) * 1e-3) / 1e12


def linear_ms(m: int, k: int, n: int, dtype: str, device: str = "cuda") -> float:
    """Median milliseconds of ``F.linear`` of (m, k) rows by an (n, k) weight, both already laid
    out (cuBLAS on a GPU): the GEMM alone, what a fused op of that shape can at best match."""
    x = torch.randn(m, k, device=device, dtype=DTYPES[dtype])
    w = torch.randn(n, k, device=device, dtype=DTYPES[dtype])
    return time_ms(lambda: torch.nn.functional.linear(x, w), device)[0]


def peak_gemm_tflops(dtype: str, device: str = "cuda", size: int = GEMM_SIZE) -> float:
    """Dense GEMM throughput of this GPU in ``dtype`` (under torch's current fp32 precision)."""
    return 2 * size**3 / (linear_ms(size, size, size, dtype, device) * 1e-3) / 1e12


def device_info(device: str) -> dict:
    import os
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
        # Runnable processes averaged over the last minute: the host's load while measuring.
        "load_1min": round(os.getloadavg()[0], 2),
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
        info["threads"] = CPU_THREADS  # the timing's; torch's own default is one per core
        info["cores"] = os.cpu_count()
    return info


# Host-overhead probe: enough back-to-back calls to average out timer resolution.
HOST_CALLS = 500


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_us(fn: Callable[[], object], device: str = "cuda", calls: int = HOST_CALLS) -> float:
    """Host (Python + launch) microseconds per call, calls issued back to back."""
    for _ in range(min(10, calls)):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _sync(device)
    return 1e6 * elapsed / calls
