"""``python -m bench.tune``: the fused op under alternative block sizes, timed in one GPU run.

The launch policy (``zeta_fused/policy.py``) was chosen from the sm_90 machine code, without a
GPU. Each variant here changes one thing from it (block sizes of the bf16/fp16 table); the
zeta-fused provider is timed on the presets and modes below, so the table can be set from
measurements. Prints milliseconds per variant (and each one's ratio to the current table) and
writes tune.json. Needs CUDA: on the interpreter timings would mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import measure
from .presets import PRESETS, Preset
from .providers import FUSED
from .runner import progress, run_cell

# name -> changes to the launch policy (a field and its value, or a dict of changes to the
# bf16/fp16 Blocks: every PLAN preset is bf16). The forward's are timed by bench.perf too.
FORWARD_VARIANTS: dict[str, dict] = {
    "fwd single 128-column tiles": {"blocks_16bit": {"fwd_pair": False}},
    "fwd 256-column tiles": {"blocks_16bit": {"fwd_n": 256, "fwd_pair": False}},
    "fwd tile 64 tokens": {"blocks_16bit": {"fwd_m": 64}},
    "fwd k=32": {"blocks_16bit": {"fwd_k": 32}},
    "fwd k=128": {"blocks_16bit": {"fwd_k": 128}},
    "fwd 4 stages": {"blocks_16bit": {"fwd_stages": 4}},
    "fwd small tiles 64x32": {"blocks_16bit": {"fwd_small_n": 32}},
    "no small-grid tiles": {"small_grid": 0},
    "plain rows fused (not cuBLAS)": {"cublas_plain_gemm": False},
}
VARIANTS: dict[str, dict] = {
    "current": {},
    **FORWARD_VARIANTS,
    "dz n=64": {"blocks_16bit": {"dz_n": 64}},
    "dz m=32 n=256": {"blocks_16bit": {"dz_m": 32, "dz_n": 256}},
    "dw d=128": {"blocks_16bit": {"dw_d": 128}},
    "dw m=32": {"blocks_16bit": {"dw_m": 32}},
    "dx k=32": {"blocks_16bit": {"dx_k": 32}},
    "warps=4": {"blocks_16bit": {"warps": 4}},
    "dw 2x programs": {"dw_target_programs": 528},
    "never re-lay the weight": {"relayout_min_tokens": 2**62},
    "always re-lay the weight": {"relayout_min_tokens": 0},
    "channels-first K order for any patch width": {"channels_first_any_width": True},
}
PLAN = [
    ("vit_b16", "fwd"),
    ("vit_b16", "train"),
    ("vit_l14", "fwd"),
    ("seed_doc_example", "fwd"),
    ("seed_doc_example", "train"),
    ("b1_latency_b16", "fwd"),
]


def unknown_fields(changes: dict) -> list[str]:
    """The fields a variant changes that the launch policy (or its Blocks) does not have: a
    variant written for a policy field still to come, or one since renamed."""
    from zeta_fused.op.policy import Blocks, LaunchPolicy

    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    missing = [name for name in changes if name not in names(LaunchPolicy)]
    for name, value in changes.items():
        if isinstance(value, dict) and name not in missing:
            missing += [f"{name}.{k}" for k in value if k not in names(Blocks)]
    return missing


def changes_nothing(changes: dict, device: str) -> bool:
    """Whether the variant leaves the device's launch policy as it is (its values are the
    defaults already)."""
    from zeta_fused.op import policy

    base = policy.for_tensor(torch.empty(0, device=device))
    with policy.override(base, **changes) as changed:
        pass
    return all(getattr(changed, f.name) == getattr(base, f.name)
               for f in dataclasses.fields(base))  # fmt: skip


def variant_cell(p: Preset, mode: str, name: str, changes: dict, device: str) -> dict:
    """The fused provider's cell under the launch policy with ``changes``; skipped, with the
    reason, when they name a field the policy does not have."""
    from zeta_fused.op import policy

    missing = unknown_fields(changes)
    if missing:
        row = {"preset": p.name, "mode": mode, "provider": FUSED, "status": "skipped"}
        return row | {"variant": name, "error": f"no launch-policy field {', '.join(missing)}"}
    with policy.override(**changes):
        return run_cell(p, mode, FUSED, device) | {"variant": name}


def run(variants: list[str], checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every (variant, PLAN cell); ``checkpoint(rows)`` after each, so a run cut short keeps
    what it measured."""
    rows = []
    for name in variants:
        for preset, mode in PLAN:
            progress(f"{name}: {preset} {mode} (compiles first)")
            rows.append(variant_cell(PRESETS[preset], mode, name, VARIANTS[name], "cuda"))
            if checkpoint is not None:
                checkpoint(rows)
    return rows


def _write(out: Path, meta: dict, rows: list[dict], complete: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "complete": complete, "rows": rows}
    (out / "tune.json").write_text(json.dumps(doc, indent=1))


def table(rows: list[dict]) -> str:
    base = {(r["preset"], r["mode"]): r.get("ms") for r in rows if r["variant"] == "current"}
    cols = [f"{p} {m}" for p, m in PLAN]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for p, m in PLAN:
            r = next(r for r in rows if r["variant"] == name and (r["preset"], r["mode"]) == (p, m))
            if r["status"] != "ok":
                cells.append(f"failed: {r.get('error', '')[:40]}")
            elif base.get((p, m)):
                cells.append(f"{r['ms']:.4f} ({r['ms'] / base[(p, m)]:.2f}x)")
            else:
                cells.append(f"{r['ms']:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__)
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.tune needs a CUDA device: it times the Triton kernels.")
        return 2
    variants = ["current", *(v for v in args.variant or VARIANTS if v != "current")]
    meta = measure.device_info("cuda")
    rows = run(variants, checkpoint=lambda rows: _write(args.out, meta, rows, complete=False))
    text = table(rows)
    print(text)
    _write(args.out, meta, rows, complete=True)
    (args.out / "tune.md").write_text(f"{meta}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
