"""``python -m bench.first_call``: what the first call of the fused op costs, per kernel variant.

Triton compiles each kernel variant on the first launch that needs it (``zeta_fused.warmup``
moves that ahead of time). On a GPU, each (preset, mode) cell runs in a fresh process with an
empty Triton cache: its first call is timed, every variant Triton compiles meanwhile is
recorded with its compile time (Triton's JIT hooks), then a warm call is timed. Without a GPU,
the kernels are cross-compiled for ``--target`` by ``tests/aot_compile.py`` (the same compile
pipeline, without loading the module on a device) and each variant's compile time is reported.
Writes first_call.json and first_call.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# One of each kind of call: image stems at batch 256, 128 and 1, the seed example, a whole stem
# and a video conv.
PRESETS = ("vit_b16", "vit_l14", "b1_latency_b16", "seed_doc_example", "vit_b16_stem",
           "videomae_b16")  # fmt: skip
MODES = ("fwd", "train")
CELL_S = 300  # a cell that takes longer (a hung compile) is reported as failed


def cell(name: str, mode: str) -> dict:
    """First and warm call of the fused provider on a preset, in this (fresh) process."""
    from zeta_fused.op.warmup import recording

    from .presets import PRESETS as ALL
    from .providers import FUSED, PROVIDERS

    row = {"preset": name, "mode": mode, "status": "ok"}
    try:
        _, step = PROVIDERS[FUSED].build(ALL[name], "cuda", mode)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with recording() as compiled:
            step()
            torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - start
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        row["warm_call_ms"] = 1e3 * (time.perf_counter() - start)
        row["compiles"] = [c._asdict() for c in compiled]
    except Exception as exc:  # noqa: BLE001 - a failing cell is reported, never dropped
        row |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:300]}
    return row


def gpu_rows(presets: list[str], checkpoint=None) -> list[dict]:
    """Every (preset, mode) cell, each in a fresh process with an empty Triton cache (with
    ZETA_FUSED_TUNING=1 in the environment each also tunes, saving to ZETA_FUSED_CACHE_DIR);
    ``checkpoint(rows)`` after each, so a run cut short keeps what it measured."""
    rows = []
    for name in presets:
        for mode in MODES:
            with tempfile.TemporaryDirectory() as cache:
                env = os.environ | {"TRITON_CACHE_DIR": cache}
                command = [sys.executable, "-m", "bench.first_call", "--cell", name, mode]
                try:
                    r = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                                       timeout=CELL_S)  # fmt: skip
                    out, err = r.stdout, r.stderr[-300:]
                except subprocess.TimeoutExpired:
                    out, err = "", f"no result within {CELL_S} s"
            lines = [line for line in out.splitlines() if line.startswith("{")]
            failed = {"preset": name, "mode": mode, "status": "failed", "error": err}
            rows.append(json.loads(lines[-1]) if lines else failed)
            print(f"{name} {mode}: {rows[-1].get('first_call_s', rows[-1].get('error'))}",
                  file=sys.stderr, flush=True)  # fmt: skip
            if checkpoint is not None:
                checkpoint(rows)
    return rows


def cpu_rows(target: str) -> tuple[list[dict], str]:
    """Every variant of the compile harness cross-compiled for ``target`` with an empty cache."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "variants.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        script = ROOT / "tests" / "aot_compile.py"
        command = [sys.executable, str(script), "--target", target, "--json", str(out)]
        r = subprocess.run(command, capture_output=True, text=True, env=env)
        if not out.exists():
            raise RuntimeError(f"the compile harness failed: {r.stdout[-500:]}{r.stderr[-500:]}")
        return json.loads(out.read_text()), r.stdout.splitlines()[0]


def per_kernel(times: dict[str, list[float]]) -> str:
    lines = ["| kernel | variants | median s | max s | total s |", "|---|---|---|---|---|"]
    for kernel, ts in sorted(times.items()):
        lines.append(f"| {kernel} | {len(ts)} | {statistics.median(ts):.2f} | {max(ts):.2f} | "
                     f"{sum(ts):.1f} |")  # fmt: skip
    return "\n".join(lines)


def gpu_table(rows: list[dict]) -> str:
    lines = ["| preset | mode | first call s | compiling s | variants | warm call ms |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    times: dict[str, list[float]] = {}
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['preset']} | {r['mode']} | failed: {r.get('error', '')[:60]} |||")
            continue
        compiles = r["compiles"]
        for c in compiles:
            times.setdefault(c["kernel"], []).append(c["seconds"])
        lines.append(f"| {r['preset']} | {r['mode']} | {r['first_call_s']:.2f} | "
                     f"{sum(c['seconds'] for c in compiles):.2f} | {len(compiles)} | "
                     f"{r['warm_call_ms']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n\nCompile time per variant:\n\n" + per_kernel(times)


def cpu_table(records: list[dict]) -> str:
    times: dict[str, list[float]] = {}
    for r in records:
        if "compile_s" in r:
            times.setdefault(r["kernel"], []).append(r["compile_s"])
    return per_kernel(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.first_call", description=__doc__)
    ap.add_argument("--preset", action="append", help=f"default: {', '.join(PRESETS)}")
    ap.add_argument("--target", default="sm_90", help="without a GPU: the architecture")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--cell", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:  # the child process of one GPU cell
        print(json.dumps(cell(*args.cell)))
        return 0
    from .measure import device_info

    args.out.mkdir(parents=True, exist_ok=True)

    def write(meta: dict, rows: list[dict], complete: bool) -> None:
        doc = {"meta": meta, "complete": complete, "rows": rows}
        (args.out / "first_call.json").write_text(json.dumps(doc, indent=1))

    if torch.cuda.is_available():
        from zeta_fused import tuning

        tuned = tuning()  # ZETA_FUSED_TUNING, read as the children read it
        meta = device_info("cuda") | {
            "method": "JIT on the GPU, empty Triton cache per cell"
            + (", tuning on (its timings included)" if tuned else "")
        }
        rows = gpu_rows(args.preset or list(PRESETS), lambda rows: write(meta, rows, False))
        text = gpu_table(rows)
    else:
        rows, triton_line = cpu_rows(args.target)
        meta = device_info("cpu") | {
            "method": f"no GPU: cross-compiled for {args.target} on this CPU with an empty "
            f"Triton cache (tests/aot_compile.py cases; no module load); {triton_line}"
        }
        text = cpu_table(rows)
    write(meta, rows, True)
    (args.out / "first_call.md").write_text(f"{meta['method']}\n\n{text}\n")
    print(f"{meta['method']}\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
