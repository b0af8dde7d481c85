"""``python -m bench.host_profile``: where the host time of fused calls goes.

The benchmark measures the batch-1 forward's host time per call and the training steps' times;
this says what those calls spend it on. For an inference forward (the ``b1_latency_b16``
module at batch 1, or ``--preset``'s) and a training step at a small batch it reports the host
microseconds per call, the Python functions that take them (cProfile, by own time and by
cumulative time: Triton's launch code, our launchers, the checks) and, from torch.profiler, the
operators and kernels each step runs with their CPU time and count. Writes host_profile.txt.
On a GPU the figures are the real ones; without one the kernels run through the interpreter,
whose cost swamps the host path (a smoke run of the tool, not a measurement).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .host import TRAIN_BATCH, case
from .measure import host_us
from .presets import CPU_PRESET, PRESETS

CHOICES = PRESETS | {CPU_PRESET.name: CPU_PRESET}


def python_profile(fn: Callable[[], object], calls: int, rows: int) -> str:
    """cProfile of ``calls`` calls, by own time then by cumulative time."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        text.write(f"--- sorted by {key}\n")
        pstats.Stats(pr, stream=text).sort_stats(key).print_stats(rows)
    return text.getvalue()


def operator_table(fn: Callable[[], object], calls: int, device: str, rows: int) -> str:
    """torch.profiler's operators and kernels of ``calls`` calls (the counts tell the launches)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)


def sections(preset: str, calls: int, train_batch: int, rows: int) -> list[tuple[str, str]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = CHOICES[preset]
    c = case(p, device, train_batch)
    out = []
    for name, fn in ((f"{p.name} forward, batch {p.batch}", c.forward),
                     (f"{p.name} training step, batch {train_batch}", c.train_step)):  # fmt: skip
        us = host_us(fn, device, calls)
        head = f"{name}: {us:.1f} us of host time per call ({device})"
        out.append(
            (
                head,
                python_profile(fn, calls, rows) + operator_table(fn, min(calls, 3), device, rows),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_profile", description=__doc__)
    ap.add_argument("--preset", default="b1_latency_b16", choices=sorted(CHOICES),
                    help="its module, input and batch for the forward")  # fmt: skip
    ap.add_argument("--calls", type=int, default=200, help="calls timed and profiled per case")
    ap.add_argument("--train-batch", type=int, default=TRAIN_BATCH)
    ap.add_argument("--rows", type=int, default=35, help="rows of each table")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args(argv)
    from .measure import device_info

    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = f"{device_info(device)}\n\n"
    for head, body in sections(args.preset, args.calls, args.train_batch, args.rows):
        print(head)
        text += f"=== {head}\n{body}\n"
    (args.out / "host_profile.txt").write_text(text)
    print(f"wrote {args.out / 'host_profile.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
