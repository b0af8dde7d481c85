"""``python -m bench.perf`` (``make gpu-perf``): the speed questions of a lent GPU, in one run.

Sections, in this order:

1. ``ceilings``: what the GPU itself reaches: device-to-device copy bandwidth and cuBLAS GEMM
   (``F.linear`` on operands already laid out) at the roofline's square size, in each dtype of
   the presets, and on the GEMM shapes (batch x tokens, patch elements, width) of ``Plan.gemms``;
2. ``forward``: every forward preset with the fused op under its default launch policy, then
   the fused op under each of :data:`VARIANTS` on a few presets, then the peers;
3. ``training``: the training presets, the fused op then the peers;
4. ``host``: host microseconds per call (batch-1 forward through the module, the bare launcher,
   ``F.linear``, a small training step) and, on a GPU, the kernels each call launches;
5. ``subsets``: the token-subset presets, the fused op then the peers;
6. ``compile``: the torch.compile peers of sections 2, 3 and 5, which take longest to start:
   last, as ``python -m bench`` runs them.

Section by section, cells start until the section's share of ``--budget-s`` is spent, counted
from the start (so time a section leaves over goes to the ones after it); a cell not started
in time is listed as not run. perf.json and perf.md are rewritten after every cell
(``complete`` false until the end), so a run stopped by a time limit keeps what it measured.
The goals of bench/goals.py are judged on the cells measured. Without CUDA it runs
:data:`SMOKE_PLAN` (tiny presets; the fused op's cells are skipped, they need CUDA): a check of
the script, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import goals, host, measure, model_stems, report, runner, tune
from .presets import (
    CONV_PRESETS,
    PRESETS,
    STEM_PRESETS,
    SUBSET_MODES,
    SUBSET_PRESETS,
    ConvPreset,
    Preset,
    StemPreset,
)
from .providers import FUSED, GPU_DEFAULT
from .tune import FORWARD_VARIANTS

# The fused op's forward under launch-policy changes (bench.tune's, one line each). A variant
# that names a field the policy does not have is skipped with that reason; one that changes
# nothing (the device's default already) is skipped too.
VARIANTS: dict[str, dict] = FORWARD_VARIANTS
# Each section's share of the budget, in run order.
SHARES = (("ceilings", 0.06), ("forward", 0.36), ("training", 0.26), ("host", 0.04),
          ("subsets", 0.10), ("compile", 0.18))  # fmt: skip


@dataclass(frozen=True)
class Plan:
    gemms: tuple  # presets whose GEMM shape cuBLAS is timed on
    forward: tuple  # presets timed forward
    variant_presets: tuple  # presets timed forward under each of VARIANTS
    training: tuple  # (preset, modes)
    host: Preset  # the host probe's preset (an image stem)
    subsets: tuple  # (preset, modes)
    providers: tuple[str, ...] = tuple(GPU_DEFAULT)
    copy_bytes: int = measure.COPY_BYTES
    square_gemm: int = measure.GEMM_SIZE
    host_calls: int = measure.HOST_CALLS

    def presets(self) -> dict[str, Preset]:
        every = [*self.gemms, *self.forward, *self.variant_presets, self.host,
                 *(p for p, _ in self.training), *(p for p, _ in self.subsets)]  # fmt: skip
        return {p.name: p for p in every}


def _named(*names: str) -> tuple:
    return tuple(PRESETS[n] for n in names)


# Most telling first within each section: a run cut short loses the tail.
IMAGE_FORWARD = ("vit_b16", "vit_l14", "sam_h16_1024", "seed_doc_example", "b1_latency_b16",
                 "seed_doc_example_fp32")  # fmt: skip
PLAN = Plan(
    gemms=_named("vit_b16", "vit_l14", "qwen2_5_vl_rows"),
    forward=_named(*IMAGE_FORWARD, *CONV_PRESETS, *STEM_PRESETS),
    variant_presets=_named("vit_b16", "vit_l14", "seed_doc_example", "b1_latency_b16"),
    training=(
        (PRESETS["vit_b16"], ("train", "train_x")),
        (PRESETS["seed_doc_example"], ("train",)),
        *((p, ("train",)) for p in _named(*CONV_PRESETS, *STEM_PRESETS, "timm_vit_b16_e2e")),
    ),
    host=PRESETS["b1_latency_b16"],
    subsets=tuple((p, SUBSET_MODES) for p in _named(*SUBSET_PRESETS)),
)
_TINY = Preset("tiny_image", 2, 3, 16, 16, (8, 8), 32, "fp32")
_TINY_ROWS = ConvPreset("tiny_rows", 8, 3, (2, 4, 4), (2, 4, 4), 16, "fp32", False, "rows")
_TINY_STEM = StemPreset("tiny_stem", "timm_vit", 2, 3, 16, 16, (8, 8), 32, 1, 1, dtype="fp32")
_TINY_SUBSET = dataclasses.replace(
    PRESETS["flip_b16_subset"], name="tiny_subset", batch=2, spatial=(32, 32), patch=(8, 8),
    dim=32, kept=8, dtype="fp32",
)  # fmt: skip
# Without CUDA: the same sections on tiny presets, the peers that start in seconds.
SMOKE_PLAN = Plan(
    gemms=(_TINY, _TINY_ROWS),
    forward=(_TINY, _TINY_ROWS, _TINY_STEM),
    variant_presets=(_TINY,),
    training=((_TINY, ("train",)), (_TINY_STEM, ("train",))),
    host=_TINY,
    subsets=((_TINY_SUBSET, ("fwd",)),),
    providers=tuple(n for n in GPU_DEFAULT if not n.startswith(runner.SLOW_START)),
    copy_bytes=1 << 20,
    square_gemm=64,
    host_calls=2,
)


@dataclass(frozen=True)
class Cell:
    section: str
    label: str
    run: Callable[[dict], None]  # measures, and records what it measured in the run's document
    preset: str = ""


def _gemm_shape(p) -> tuple[int, int, int]:
    return p.batch * p.embedded, p.patch_dim, p.dim


def _ceiling(name: str, shape: str, measure_ms: Callable[[], float], nbytes: int,
             flops: int = 0, peak: str = "") -> Callable[[dict], None]:  # fmt: skip
    def run(doc: dict) -> None:
        row = {"ceiling": name, "shape": shape, "status": "ok"}
        try:
            ms = measure_ms()
            row |= {"ms": ms, "tbps": nbytes / (ms * 1e-3) / 1e12}
            if flops:
                row["tflops"] = flops / (ms * 1e-3) / 1e12
            if peak:  # an input of the roofline
                doc["roofline"][peak] = row["tflops" if flops else "tbps"]
        except Exception as exc:  # noqa: BLE001 - a failing probe is reported, never dropped
            row |= {"status": "failed", "error": runner._reason(exc)}
        doc["ceilings"].append(row)

    return run


def ceiling_cells(plan: Plan, device: str) -> list[Cell]:
    n = plan.copy_bytes
    copy = _ceiling("copy", f"{n} bytes", lambda: measure.copy_ms(n, device), 2 * n,
                    peak="copy_tbps")  # fmt: skip
    cells = [Cell("ceilings", "copy", copy)]
    dtypes = sorted({p.dtype for p in plan.presets().values()})
    gemms = [(f"gemm {d}", (plan.square_gemm,) * 3, d, f"gemm_tflops_{d}") for d in dtypes]
    gemms += [(f"gemm {p.name}", _gemm_shape(p), p.dtype, "") for p in plan.gemms]
    for name, (m, k, n_), dtype, peak in gemms:
        size = measure.DTYPES[dtype].itemsize
        run = _ceiling(name, f"{m}x{k}x{n_} {dtype}",
                       lambda m=m, k=k, n_=n_, d=dtype: measure.linear_ms(m, k, n_, d, device),
                       size * (m * k + n_ * k + m * n_), 2 * m * k * n_, peak)  # fmt: skip
        cells.append(Cell("ceilings", name, run))
    return cells


def _row_cell(section: str, p, mode: str, name: str, device: str) -> Cell:
    def run(doc: dict) -> None:
        doc["results"].append(runner.run_cell(p, mode, name, device) | {"section": section})

    return Cell(section, f"{p.name} {mode} {name}", run, p.name)


def _variant_cell(p, name: str, changes: dict, device: str) -> Cell:
    def run(doc: dict) -> None:
        if not tune.unknown_fields(changes) and tune.changes_nothing(changes, device):
            row = {"preset": p.name, "mode": "fwd", "provider": FUSED, "variant": name}
            row |= {"status": "skipped", "error": "the device's default policy already"}
        else:
            row = tune.variant_cell(p, "fwd", name, changes, device)
        doc["results"].append(row | {"section": "forward"})

    return Cell("forward", f"{p.name} fwd {FUSED} [{name}]", run)


def _host_cells(plan: Plan, device: str) -> list[Cell]:
    p, skipped = plan.host, {"skipped": "needs CUDA (the interpreter's time would swamp it)"}

    def overhead(doc: dict) -> None:
        on_gpu = device == "cuda"
        doc["host_overhead"][p.name] = (
            runner.host_overhead(p, device, plan.host_calls) if on_gpu else dict(skipped)
        )

    def launches(doc: dict) -> None:
        entry = doc["host_overhead"].setdefault(p.name, {})
        if device != "cuda":
            entry["launches"] = dict(skipped)
            return
        try:
            c = host.case(p, device)
            calls = {"forward": c.forward, "training step": c.train_step}
            entry["launches"] = {k: host.count_launches(fn, device) for k, fn in calls.items()}
        except Exception as exc:  # noqa: BLE001 - reported in the output, never fatal
            entry["launches"] = {"failed": runner._reason(exc)}

    return [Cell("host", f"host time {p.name}", overhead),
            Cell("host", f"launches {p.name}", launches)]  # fmt: skip


class Split(NamedTuple):
    """A section's cells by provider."""

    fused: list[Cell]
    peers: list[Cell]
    compiles: list[Cell]


def _split(section: str, pairs, providers: list[str], device: str) -> Split:
    split = Split([], [], [])
    for p, modes in pairs:
        for mode in modes:
            for name in runner._providers_of(p, providers):
                cell = _row_cell(section, p, mode, name, device)
                if name == FUSED:
                    split.fused.append(cell)
                elif name.startswith(runner.SLOW_START):
                    split.compiles.append(cell)
                else:
                    split.peers.append(cell)
    return split


def cells(plan: Plan, device: str) -> list[Cell]:
    """Every cell of the run, in run order: each section's fused cells (the forward's then
    under each variant), its peers; the compile peers of every section at the end."""
    providers = list(plan.providers)
    forward = _split("forward", [(p, ("fwd",)) for p in plan.forward], providers, device)
    training = _split("training", plan.training, providers, device)
    subsets = _split("subsets", plan.subsets, providers, device)
    variants = [_variant_cell(p, name, changes, device)
                for p in plan.variant_presets for name, changes in VARIANTS.items()]  # fmt: skip
    # A preset's compile peers together, the presets in plan order: a run cut short has every
    # peer of the first presets, whose goals it can then judge.
    splits = (forward, training, subsets)
    order = list(dict.fromkeys(c.preset for split in splits for c in split.fused))
    compiles = [
        dataclasses.replace(c, section="compile") for split in splits for c in split.compiles
    ]
    compiles.sort(key=lambda c: order.index(c.preset))
    return [
        *ceiling_cells(plan, device),
        *forward.fused, *variants, *forward.peers,
        *training.fused, *training.peers,
        *_host_cells(plan, device),
        *subsets.fused, *subsets.peers,
        *compiles,
    ]  # fmt: skip


def run(plan: Plan, device: str, out: Path, budget_s: float, max_cells: int | None = None,
        meta: dict | None = None) -> dict:  # fmt: skip
    """Every cell in order, within the budget; the documents rewritten after each."""
    meta = meta or measure.device_info(device) | {"peers": model_stems.versions()}
    doc = {"meta": meta, "budget_s": budget_s, "complete": False, "ceilings": [],
           "roofline": {}, "results": [], "host_overhead": {}, "not_run": [],
           "modelled": runner.modelled([(p, ()) for p, _ in plan.subsets])}  # fmt: skip
    todo = cells(plan, device)
    start, share, deadlines = time.monotonic(), 0.0, {}
    for section, part in SHARES:
        share += part
        deadlines[section] = start + share * budget_s
    with runner.frozen_heap() as after_cell:
        for i, cell in enumerate(todo, 1):
            if max_cells is not None and i > max_cells:
                doc["not_run"].append(f"{cell.label} (--max-cells {max_cells})")
                continue
            if time.monotonic() > deadlines[cell.section]:
                doc["not_run"].append(f"{cell.label} (the {cell.section} section's time)")
                continue
            runner.progress(f"[{i}/{len(todo)}] {cell.section}: {cell.label}")
            cell.run(doc)
            after_cell()
            write(doc, plan, out)
    doc["complete"] = True
    write(doc, plan, out)
    return doc


def write(doc: dict, plan: Plan, out: Path) -> None:
    """perf.json and perf.md from the cells measured so far."""
    runner.derive(doc["results"], plan.presets(), doc["roofline"])
    verdicts = goals.judge(doc["results"], doc["host_overhead"])
    doc["goals"] = [dataclasses.asdict(v) for v in verdicts]
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "perf.md").write_text(markdown(doc))


def ceiling_lines(doc: dict) -> list[str]:
    """The ceilings measured, as a Markdown table."""
    out = ["| ceiling | shape | ms | TFLOP/s | TB/s |", "|---|---|---|---|---|"]
    for c in doc["ceilings"]:
        if c["status"] != "ok":
            out.append(f"| {c['ceiling']} | {c['shape']} | failed: {c['error']} | | |")
            continue
        tflops = f"{c['tflops']:.1f}" if "tflops" in c else "-"
        out.append(f"| {c['ceiling']} | {c['shape']} | {c['ms']:.4f} | {tflops} | "
                   f"{c['tbps']:.2f} |")  # fmt: skip
    return out


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    installed = {"driver": meta.get("driver"), "cuda": meta.get("cuda"), **meta.get("peers", {})}
    versions = ", ".join(f"{k} {v}" for k, v in installed.items() if v)
    run = "complete" if doc["complete"] else "in progress or stopped"
    out = [f"**{report._title(meta)}**" + (f" ({versions})" if versions else ""), "",
           f"`python -m bench.perf`, budget {doc['budget_s']:.0f} s: {run}; "
           f"{len(doc['not_run'])} cells not run.", "", "Ceilings of the device:", "",
           *ceiling_lines(doc)]  # fmt: skip
    for section, _ in SHARES[1:]:
        rows = [r for r in doc["results"] if r["section"] == section]
        if rows:
            cells = report.table(rows)
            out += ["", f"{section.capitalize()}:", "", "| " + " | ".join(cells[0]) + " |",
                    "|" + "---|" * len(cells[0])]  # fmt: skip
            out += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    out += ["", report.LEGEND, "", *report.host_lines(doc["host_overhead"])]
    out += ["", *report.modelled_lines(doc["modelled"])]
    verdicts = report.goal_lines(doc["results"], doc["host_overhead"])
    if verdicts:
        out += ["", verdicts[0] + " (the fastest peer of those measured: see Not run)", "",
                *(f"- {v.strip()}" for v in verdicts[1:])]  # fmt: skip
    if doc["not_run"]:
        out += ["", "Not run:", "", *(f"- {label}" for label in doc["not_run"])]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="seconds within which cells start (each section its share)")  # fmt: skip
    ap.add_argument("--max-cells", type=int, default=None, help="stop after this many cells")
    ap.add_argument("--smoke", action="store_true", help="the tiny smoke plan, even on a GPU")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = SMOKE_PLAN if args.smoke or device != "cuda" else PLAN
    if plan is SMOKE_PLAN:
        print("The smoke plan (tiny presets): a check of the script, not a measurement.")
    doc = run(plan, device, args.out, args.budget_s, args.max_cells)
    print("\n".join(ceiling_lines(doc)))
    print("\n".join(report.host_lines(doc["host_overhead"])))
    print("\n".join(report.goal_lines(doc["results"], doc["host_overhead"])))
    print(f"wrote {args.out / 'perf.json'}, {args.out / 'perf.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
