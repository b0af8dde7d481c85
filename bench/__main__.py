"""``python -m bench``: zeta-fused against its peers and the roofline, measured in one run."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import measure, model_stems, report, runner
from .presets import ALL_MODES, CPU_PRESET, PRESETS, QUICK, parse_shape
from .providers import CPU_DEFAULT, GPU_DEFAULT, PROVIDERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--preset",
        action="append",
        help=f"quick | all | one of {', '.join(PRESETS)} (repeatable; GPU default: quick)",
    )
    ap.add_argument("--shape", action="append", default=[], help="B,C,H,W,patch,D[,dtype]")
    ap.add_argument("--modes", default=None, help=f"comma list of {', '.join(ALL_MODES)}")
    ap.add_argument("--providers", default=None, help=f"comma list of {', '.join(PROVIDERS)}")
    ap.add_argument("--autotune", action="store_true", help="add compile max-autotune")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="JSON/Markdown/PNG dir")
    return ap.parse_args(argv)


def plan_for(args: argparse.Namespace, device: str) -> list:
    modes = tuple(args.modes.split(",")) if args.modes else None
    for m in modes or ():
        if m not in ALL_MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {ALL_MODES}")
    plan = []
    for name in args.preset or ([] if args.shape or device != "cuda" else ["quick"]):
        if name == "quick":
            plan += [(PRESETS[n], modes or ms) for n, ms in QUICK]
        elif name == "all":
            plan += [(p, modes or ALL_MODES) for p in PRESETS.values()]
        elif name in PRESETS:
            plan.append((PRESETS[name], modes or ALL_MODES))
        else:
            raise SystemExit(f"unknown preset {name!r}; choose quick, all or {', '.join(PRESETS)}")
    plan += [(parse_shape(s), modes or ALL_MODES) for s in args.shape]
    if not plan:  # no GPU and nothing asked: a small eager preset on the CPU
        plan = [(CPU_PRESET, modes or ALL_MODES)]
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    providers = (
        args.providers.split(",")
        if args.providers
        else list(GPU_DEFAULT if device == "cuda" else CPU_DEFAULT)
    )
    if args.autotune and "compile-max-autotune" not in providers:
        providers.append("compile-max-autotune")
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {', '.join(PROVIDERS)}")
    if device != "cuda":
        print(
            "No CUDA device: eager providers only, on the CPU. The Triton providers "
            "(zeta-fused) need CUDA."
        )
    meta = measure.device_info(device)
    plan = plan_for(args, device)
    if any(p.family == "stem" for p, _ in plan):  # whole stems: the models' packages measured
        meta["peers"] = model_stems.versions()
    rows, peaks, host = runner.run(
        plan,
        providers,
        device,
        checkpoint=lambda rows, peaks, host: report.write_json(
            rows, meta, peaks, host, args.out, complete=False
        ),
    )
    print(report.terminal(rows, meta, host))
    written = report.write(rows, meta, peaks, host, args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
