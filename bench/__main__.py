"""``python -m bench``: zeta-fused against its peers and the roofline, measured in one run."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import measure, model_stems, report, runner
from .presets import (
    ALL_MODES,
    CPU_PRESET,
    PRESETS,
    QUICK,
    SUBSET_MODES,
    SUBSET_PRESETS,
    parse_shape,
)
from .providers import CPU_DEFAULT, GPU_DEFAULT, PROVIDERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--preset",
        action="append",
        help=f"quick | all | subset | one of {', '.join(PRESETS)} (repeatable; GPU default: quick)",
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
        elif name == "subset":  # the token-subset presets, forward and training step
            plan += [(PRESETS[n], modes or SUBSET_MODES) for n in SUBSET_PRESETS]
        elif name == "all":
            plan += [(p, modes or ALL_MODES) for p in PRESETS.values()]
        elif name in PRESETS:
            plan.append((PRESETS[name], modes or ALL_MODES))
        else:
            raise SystemExit(
                f"unknown preset {name!r}; choose quick, all, subset or {', '.join(PRESETS)}"
            )
    for text in args.shape:
        try:
            plan.append((parse_shape(text), modes or ALL_MODES))
        except ValueError as exc:  # a usage error, not a traceback
            raise SystemExit(str(exc)) from None
    if not plan:
        # No GPU and nothing asked: a small eager preset on the CPU, and the subset presets with
        # no mode (none of their cells timed: only their modelled figures are reported).
        plan = [(CPU_PRESET, modes or ALL_MODES)] + [(PRESETS[n], ()) for n in SUBSET_PRESETS]
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
    if any(p.family in ("stem", "subset") and ms for p, ms in plan):  # the models measured
        meta["peers"] = model_stems.versions()
    modelled = runner.modelled(plan)
    rows, peaks, host = runner.run(
        plan,
        providers,
        device,
        checkpoint=lambda rows, peaks, host: report.write_json(
            rows, meta, peaks, host, args.out, complete=False, modelled=modelled
        ),
    )
    print(report.terminal(rows, meta, host, modelled))
    written = report.write(rows, meta, peaks, host, args.out, modelled)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
