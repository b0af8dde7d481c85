"""The project's performance goals, judged against the figures of one benchmark run.

Each goal reads the rows the run produced (never a number from elsewhere) and comes out as
met, missed or not measured in this run (a preset or mode left out, a provider that failed).
"""

from __future__ import annotations

from dataclasses import dataclass

from .presets import STEM_PRESETS, SUBSET_MODES, SUBSET_PRESETS
from .providers import FUSED

# Forward presets that must reach this share of the roofline measured in the same run (a whole
# stem's roofline counts its tables and prefix rows: bench/presets.py).
ROOFLINE_PRESETS = ("seed_doc_example", "vit_b16", "vit_l14", "sam_h16_1024", "videomae_b16",
                    "qwen2_5_vl_rows", "wan_latents", "series", *STEM_PRESETS)  # fmt: skip
MIN_PCT_ROOFLINE = 60.0
# Batch-1 latency of one forward call, host overhead included, in milliseconds.
LATENCY_PRESET, MAX_LATENCY_MS = "b1_latency_b16", 0.025
# Its GPU time alone: 196 tokens spread over enough SMs.
MAX_LATENCY_GPU_MS = 0.020
# Training speed-ups over the fastest peer: (preset, mode, at least).
TRAIN_SPEEDUPS = (
    ("vit_b16", "train", 3.0),
    ("seed_doc_example", "train", 2.0),
    ("vit_b16", "train_x", 2.0),
    # The conv presets' training step: faster than the fastest of their peers.
    ("videomae_b16", "train", 1.0),
    ("qwen2_5_vl_rows", "train", 1.0),
    ("wan_latents", "train", 1.0),
    ("series", "train", 1.0),
    # The whole stem's training step, every parameter's gradient (table, class token, norm).
    ("vit_b16_stem", "train", 2.0),
    *((name, "train", 1.0) for name in STEM_PRESETS if name != "vit_b16_stem"),
)
# Whole stems: the forward against the fastest of the model's eager stem and its compile.
STEM_SPEEDUPS = tuple((name, "fwd", 1.5) for name in STEM_PRESETS)
# The large image stems' forward against torch.compile of the eager module: (preset, at least).
COMPILE_PEER = "compile"
COMPILE_SPEEDUPS = (("vit_b16", 1.5), ("vit_l14", 1.5), ("sam_h16_1024", 1.5))
# Token subsets: the forward and the training step faster than the fastest of the model's
# embed-then-gather and its compile (the modelled bytes and flops ratios are 2x to 10x; what a
# GPU makes of them is for the first run to say).
SUBSET_SPEEDUPS = tuple((name, mode, 1) for name in SUBSET_PRESETS for mode in SUBSET_MODES)
# Peak extra memory of a vit_b16 training step, as a share of the eager Sequential's.
MEMORY_PRESET, MAX_PCT_EAGER_MIB = "vit_b16", 40.0
# The module's host time per call over a bare launch of the same kernel.
MAX_HOST_RATIO = 1.5


@dataclass(frozen=True)
class Verdict:
    goal: str
    met: bool | None  # None: not measured in this run
    detail: str

    def line(self) -> str:
        mark = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"{mark:>12}  {self.goal}: {self.detail}"


def _row(rows: list[dict], preset: str, mode: str, provider: str) -> dict | None:
    """The provider's timed row (the fused op's: under its default launch policy)."""
    for r in rows:
        same = (r["preset"], r["mode"], r["provider"]) == (preset, mode, provider)
        if same and "ms" in r and not r.get("variant"):
            return r
    return None


def _peers(rows: list[dict], preset: str, mode: str) -> list[dict]:
    return [
        r
        for r in rows
        if (r["preset"], r["mode"]) == (preset, mode) and r["provider"] != FUSED and "ms" in r
    ]


def _speedup(rows: list[dict], preset: str, mode: str, goal: str, at_least: float,
             peer: str | None = None) -> Verdict:  # fmt: skip
    """The fastest peer's (or ``peer``'s) time over zeta-fused's, against a minimum (1:
    simply faster)."""
    r, peers = _row(rows, preset, mode, FUSED), _peers(rows, preset, mode)
    peers = [p for p in peers if peer in (None, p["provider"])]
    if r is None or not peers:
        return Verdict(goal, None, f"no fused timing or no {peer or 'peer'} timing")
    best = min(peers, key=lambda p: p["ms"])
    speedup = best["ms"] / r["ms"]
    met = speedup > 1 if at_least == 1 else speedup >= at_least
    which = f"the fastest peer ({best['provider']})" if peer is None else peer
    return Verdict(goal, met, f"{speedup:.2f}x {which}")


def _latency(rows: list[dict], host: dict) -> Verdict:
    # Back to back, a call takes the longer of its GPU time and its host time.
    goal = f"{LATENCY_PRESET} forward <= {1e3 * MAX_LATENCY_MS:.0f} us per call, host included"
    r, h = _row(rows, LATENCY_PRESET, "fwd", FUSED), host.get(LATENCY_PRESET, {})
    if r is None or "module_us" not in h:
        return Verdict(goal, None, "no fused timing or no host time")
    per_call_us = max(1e3 * r["ms"], h["module_us"])
    detail = f"{per_call_us:.1f} us (GPU {1e3 * r['ms']:.1f} us, host {h['module_us']:.1f} us)"
    return Verdict(goal, per_call_us <= 1e3 * MAX_LATENCY_MS, detail)


def judge(rows: list[dict], host: dict) -> list[Verdict]:
    out = []
    for preset in ROOFLINE_PRESETS:
        goal = f"{preset} forward >= {MIN_PCT_ROOFLINE:.0f}% of the roofline"
        r = _row(rows, preset, "fwd", FUSED)
        pct = r.get("pct_roofline") if r else None
        met = None if pct is None else pct >= MIN_PCT_ROOFLINE
        out.append(
            Verdict(goal, met, "no fused timing or roofline" if met is None else f"{pct:.0f}%")
        )
    out.append(_latency(rows, host))
    goal = f"{LATENCY_PRESET} forward <= {1e3 * MAX_LATENCY_GPU_MS:.0f} us of GPU time"
    r = _row(rows, LATENCY_PRESET, "fwd", FUSED)
    out.append(
        Verdict(goal, None, "no fused timing")
        if r is None
        else Verdict(goal, r["ms"] <= MAX_LATENCY_GPU_MS, f"{1e3 * r['ms']:.1f} us")
    )
    for preset, at_least in COMPILE_SPEEDUPS:
        goal = f"{preset} forward >= {at_least:g}x torch.compile"
        out.append(_speedup(rows, preset, "fwd", goal, at_least, COMPILE_PEER))
    listed = STEM_SPEEDUPS + TRAIN_SPEEDUPS + SUBSET_SPEEDUPS
    for preset in sorted({r["preset"] for r in rows if r["mode"] == "fwd"}):
        if (preset, "fwd", 1) not in listed:  # judged below, measured or not
            out.append(_speedup(rows, preset, "fwd", f"{preset} forward faster than every peer", 1))
    for preset, mode, at_least in listed:
        what = f"{preset} {'forward' if mode == 'fwd' else mode}"
        goal = (
            f"{what} faster than every peer"
            if at_least == 1
            else f"{what} >= {at_least:g}x the fastest peer"
        )
        out.append(_speedup(rows, preset, mode, goal, at_least))
    goal = f"{MEMORY_PRESET} training step <= {MAX_PCT_EAGER_MIB:.0f}% of eager's extra memory"
    r = _row(rows, MEMORY_PRESET, "train", FUSED)
    pct = r.get("pct_eager_mib") if r else None
    out.append(
        Verdict(goal, None, "no fused or eager memory figure")
        if pct is None
        else Verdict(goal, pct <= MAX_PCT_EAGER_MIB, f"{pct:.0f}% ({r['peak_extra_mib']:.0f} MiB)")
    )
    goal = f"host time per call <= {MAX_HOST_RATIO}x a bare launch"
    h = host.get(LATENCY_PRESET, {})
    out.append(
        Verdict(goal, None, h.get("failed", "not measured"))
        if "ratio" not in h
        else Verdict(goal, h["ratio"] <= MAX_HOST_RATIO, f"{h['ratio']:.2f}x")
    )
    return out
