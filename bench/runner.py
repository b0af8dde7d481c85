"""Runs every (preset, mode, provider) cell and derives the reported figures."""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator

import torch

from . import measure
from .host import case as host_case
from .model_stems import MissingPeer
from .presets import Preset
from .providers import CONV, E2E, EAGER, FUSED, PROVIDERS, STEM

# Providers whose first call compiles (and maybe autotunes) for a long time.
SLOW_START = ("compile",)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def frozen_heap() -> Iterator[Callable[[], None]]:
    """For a run of cells: the objects alive now left out of garbage collection until the end.
    With torch, timm and transformers loaded, each collection between two cells would scan
    every one of their objects again (about half a second a cell on a busy 2-core machine).
    Yields the function to call after each cell: it frees the cell's memory, then freezes what
    survives (the modules a cell imported lazily)."""

    def after_cell() -> None:
        _free()
        gc.freeze()

    after_cell()
    try:
        yield after_cell
    finally:
        gc.unfreeze()


def run_cell(preset: Preset, mode: str, name: str, device: str) -> dict:
    provider = PROVIDERS[name]
    row = {"preset": preset.name, "mode": mode, "provider": name, "status": "ok"}
    if provider.note:
        row["note"] = provider.note
    if provider.needs_cuda and device != "cuda":
        return row | {"status": "skipped", "error": "needs CUDA"}
    try:
        model, step = provider.build(preset, device, mode)
        step()  # first call: compilation / autotuning happen here, outside the timing
        row["ms"], row["ms_p20"], row["ms_p80"] = measure.time_ms(step, device)
        if mode != "fwd":
            row["peak_extra_mib"] = measure.peak_extra_mib(step, device)
        del model, step
    except MissingPeer as exc:  # the model's package is not on this machine: not a failure
        row |= {"status": "skipped", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failing provider is reported, never dropped
        row |= {"status": "failed", "error": _reason(exc)}
    _free()
    return row


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def roofline(presets: list[Preset], device: str) -> dict:
    """Peak copy bandwidth and GEMM throughput of this GPU, measured now (CUDA only). A probe
    that fails is reported under ``failed``; the run goes on without % of roofline."""
    if device != "cuda":
        return {}
    progress("measuring the roofline: copy bandwidth and GEMM throughput ...")
    try:
        peaks = {"copy_tbps": measure.peak_copy_tbps()}
        for dtype in sorted({p.dtype for p in presets}):
            peaks[f"gemm_tflops_{dtype}"] = measure.peak_gemm_tflops(dtype)
    except Exception as exc:  # noqa: BLE001 - reported in the output, never fatal
        peaks = {"failed": _reason(exc)}
    _free()
    return peaks


def derive(rows: list[dict], presets: dict[str, Preset], peaks: dict) -> None:
    """Add the timing spread (p80 / p20), TB/s, TFLOP/s and % of roofline (forward), the ratio
    to the fused provider's default (a launch-policy variant of it too), and (training) peak
    extra memory as % of the eager Sequential's."""
    fused = {
        (r["preset"], r["mode"]): r["ms"]
        for r in rows
        if r["provider"] == FUSED and "ms" in r and not r.get("variant")
    }
    eager_mib = {
        (r["preset"], r["mode"]): r["peak_extra_mib"]
        for r in rows
        if r["provider"] == EAGER and r.get("peak_extra_mib")
    }
    for r in rows:
        if "ms" not in r:
            continue
        if r.get("ms_p20"):
            r["spread"] = r["ms_p80"] / r["ms_p20"]
        p = presets[r["preset"]]
        if r["mode"] == "fwd":
            r["tbps"] = p.bytes() / (r["ms"] * 1e-3) / 1e12
            r["tflops"] = p.flops() / (r["ms"] * 1e-3) / 1e12
            if "copy_tbps" in peaks:
                floor_ms = 1e3 * max(
                    p.bytes() / (peaks["copy_tbps"] * 1e12),
                    p.flops() / (peaks[f"gemm_tflops_{p.dtype}"] * 1e12),
                )
                r["roofline_ms"] = floor_ms
                r["pct_roofline"] = 100 * floor_ms / r["ms"]
        if (r["preset"], r["mode"]) in fused:
            r["x_vs_fused"] = r["ms"] / fused[(r["preset"], r["mode"])]
        if r.get("peak_extra_mib") is not None and (r["preset"], r["mode"]) in eager_mib:
            r["pct_eager_mib"] = 100 * r["peak_extra_mib"] / eager_mib[(r["preset"], r["mode"])]


def modelled(plan: list[tuple[Preset, tuple[str, ...]]]) -> dict:
    """The modelled figures of the plan's subset presets (bytes and flops of embedding every
    patch then gathering vs the fused subset), whether or not their cells are timed."""
    return {p.name: p.modelled() for p, _ in plan if p.family == "subset"}


# Presets whose per-call host overhead is measured (small batches, where it matters).
HOST_PRESETS = ("b1_latency_b16",)


def host_overhead(p: Preset, device: str, calls: int = measure.HOST_CALLS) -> dict:
    """Host microseconds per call (calls issued back to back) of the module's inference path,
    of a bare launch of the same kernel, of ``F.linear`` on the same rows (torch's own cost
    here) and of a small training step (bench.host). A failure is reported under ``failed``."""
    progress(f"host overhead: {p.name}")
    try:
        c = host_case(p, device)
        out = {
            "module_us": measure.host_us(c.forward, device, calls),
            "launch_us": measure.host_us(c.launch, device, calls),
            "linear_us": measure.host_us(c.linear, device, calls),
            # Fewer steps: each launches several kernels, and a full launch queue would make
            # the host wait for the GPU.
            "train_step_us": measure.host_us(c.train_step, device, max(1, calls // 10)),
            "train_batch": c.train_batch,
        }
        out["ratio"] = out["module_us"] / out["launch_us"]
    except Exception as exc:  # noqa: BLE001 - reported in the output, never fatal
        out = {"failed": _reason(exc)}
    _free()
    return out


def _providers_of(p: Preset, providers: list[str]) -> list[str]:
    """The whole-model providers for an end-to-end preset, the conv ones (on a GPU; the eager
    ones on a CPU) for a conv preset, the chosen ones of the whole-stem providers for a stem or
    subset preset, the chosen ones otherwise."""
    if p.e2e:
        return E2E
    if p.family == "conv":
        return [n for n in CONV if n in providers or n == "linear-rewrite"]
    if p.family in ("stem", "subset"):
        return [n for n in STEM if n in providers]
    return [n for n in providers if n not in E2E]


def run(
    plan: list[tuple[Preset, tuple[str, ...]]],
    providers: list[str],
    device: str,
    checkpoint: Callable[[list[dict], dict, dict], None] | None = None,
) -> tuple:
    """The roofline, (CUDA, fused) the host overhead, every cell of the plan, then the derived
    figures. ``checkpoint(rows, peaks, host)`` runs after each cell, so a run cut short keeps
    what it measured (the quick host probe runs before the cells for the same reason)."""
    presets = {p.name: p for p, _ in plan}
    peaks = roofline(list(presets.values()), device)
    host = {}
    if device == "cuda" and FUSED in providers:
        host = {n: host_overhead(p, device) for n, p in presets.items() if n in HOST_PRESETS}
    cells = [
        (p, m, name) for p, modes in plan for m in modes for name in _providers_of(p, providers)
    ]
    order = {(p.name, m, name): i for i, (p, m, name) in enumerate(cells)}
    # Slow-starting providers run last, so a run cut short by a time limit has every other
    # figure; the rows are reported in plan order.
    cells.sort(key=lambda cell: cell[2].startswith(SLOW_START))
    rows = []
    with frozen_heap() as after_cell:
        for i, (p, mode, name) in enumerate(cells, 1):
            slow = " (compiling, can take minutes)" if name.startswith(SLOW_START) else ""
            progress(f"[{i}/{len(cells)}] {p.name} {mode} {name}{slow}")
            rows.append(run_cell(p, mode, name, device))
            after_cell()
            if checkpoint is not None:
                checkpoint(rows, peaks, host)
    rows.sort(key=lambda r: order[(r["preset"], r["mode"], r["provider"])])
    derive(rows, presets, peaks)
    return rows, peaks, host
