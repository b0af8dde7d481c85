"""Terminal table, Markdown table, JSON and the PNG chart of a benchmark run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from . import goals
from .providers import FUSED

COLUMNS = [  # (header, key, format)
    ("preset", "preset", "{}"),
    ("mode", "mode", "{}"),
    ("provider", "provider", "{}"),
    ("ms", "ms", "{:.4f}"),
    ("p80/p20", "spread", "{:.2f}"),
    ("TB/s", "tbps", "{:.2f}"),
    ("TFLOP/s", "tflops", "{:.1f}"),
    ("% roofline", "pct_roofline", "{:.0f}%"),
    ("peak MiB", "peak_extra_mib", "{:.0f}"),
    ("% eager MiB", "pct_eager_mib", "{:.0f}%"),
    ("x fused", "x_vs_fused", "{:.2f}x"),
]


LEGEND = ("ms: the median call (on a CPU: of its thread's CPU time). p80/p20: the spread of the "
          "timed calls (80th over 20th percentile). x fused: the provider's time over "
          "zeta-fused's (above 1: zeta-fused is faster).")  # fmt: skip


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "ms" and row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')}"
    if key == "provider" and row.get("variant"):  # the fused op under a launch-policy change
        return f"{row['provider']} [{row['variant']}]"
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def table(rows: list[dict]) -> list[list[str]]:
    return [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in rows]


def host_lines(host: dict) -> list[str]:
    """Per host-probe preset: its host microseconds per call and, where counted, the kernels
    each call launches."""
    lines = []
    for name, h in host.items():
        head = f"host overhead {name}: "
        if "failed" in h or "skipped" in h:
            lines.append(head + ("failed: " + h["failed"] if "failed" in h else h["skipped"]))
        elif "module_us" in h:
            line = (f"module {h['module_us']:.1f} us/call, bare kernel launch "
                    f"{h['launch_us']:.1f} us/call ({h['ratio']:.2f}x)")  # fmt: skip
            if "linear_us" in h:
                step = f"training step (batch {h['train_batch']}) {h['train_step_us']:.1f}"
                line += f", F.linear on its rows {h['linear_us']:.1f} us/call, {step} us/call"
            lines.append(head + line)
        lines += [f"launches {name}: {line}" for line in launch_lines(h.get("launches", {}))]
    return lines


def launch_lines(launches: dict) -> list[str]:
    """Kernels and kernel-launching torch operators per call (bench.host.count_launches)."""
    if "failed" in launches or "skipped" in launches:
        return [launches.get("failed") or launches["skipped"]]
    out = []
    for call, c in launches.items():
        ops = ", ".join(f"{op} {n:g}" for op, n in c["torch_ops"].items()) or "none"
        out.append(f"{call}: {c['triton_launches']:g} Triton kernels, {c['other_kernels']:g} "
                   f"other GPU kernels, launched by {c['torch_kernel_ops']:g} torch ops "
                   f"({ops})")  # fmt: skip
    return out


def modelled_lines(modelled: dict | None) -> list[str]:
    """The subset presets' modelled forward figures: arithmetic from their sizes, no timing."""
    if not modelled:
        return []
    lines = ["Token subsets, modelled, not measured (one forward's compulsory bytes and GEMM "
             "flops: embed every patch then gather / the fused subset):"]  # fmt: skip
    for name, m in modelled.items():
        lines.append(
            f"{name} ({m['kept']} of {m['tokens']} patches kept): bytes "
            f"{m['gather_bytes'] / 1e6:.1f} MB / {m['subset_bytes'] / 1e6:.1f} MB = "
            f"{m['bytes_ratio']:.2f}x, flops {m['gather_flops'] / 1e9:.1f} GFLOP / "
            f"{m['subset_flops'] / 1e9:.1f} GFLOP = {m['flops_ratio']:.2f}x"
        )
    return lines


def goal_lines(rows: list[dict], host: dict) -> list[str]:
    """The performance goals judged on this run's figures (none when nothing fused was timed)."""
    verdicts = goals.judge(rows, host)
    if all(v.met is None for v in verdicts):
        return []
    return ["Goals, judged on this run:"] + [v.line() for v in verdicts]


def terminal(rows: list[dict], meta: dict, host: dict, modelled: dict | None = None) -> str:
    cells = table(rows)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = [_title(meta)]
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(LEGEND)
    return "\n".join(lines + host_lines(host) + modelled_lines(modelled) + goal_lines(rows, host))


def markdown(
    rows: list[dict], meta: dict, peaks: dict, host: dict, modelled: dict | None = None
) -> str:
    cells = table(rows)
    out = [f"**{_title(meta)}**", ""]
    if peaks:
        out += ["Roofline inputs measured in the same run: " + _peaks(peaks), ""]
    out.append("| " + " | ".join(cells[0]) + " |")
    out.append("|" + "---|" * len(cells[0]))
    out += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    out += ["", LEGEND]
    out += [""] + host_lines(host) if host else []
    subsets = modelled_lines(modelled)
    out += ["", subsets[0], "", *(f"- {line}" for line in subsets[1:])] if subsets else []
    verdicts = goal_lines(rows, host)
    out += ["", verdicts[0], "", *(f"- {v.strip()}" for v in verdicts[1:])] if verdicts else []
    return "\n".join(out) + "\n"


def _title(meta: dict) -> str:
    where = meta.get("gpu") or (
        f"CPU ({meta.get('cpu')}, timed on {meta.get('threads')} thread(s) of "
        f"{meta.get('cores')} cores, load {meta.get('load_1min')})"
    )
    return (
        f"zeta-fused {meta['zeta_fused']} on {where}, torch {meta['torch']}, "
        f"triton {meta['triton']}, {meta['date']}"
    )


def _peaks(peaks: dict) -> str:
    if "failed" in peaks:
        return f"failed: {peaks['failed']}"
    return ", ".join(
        f"{k.replace('_', ' ')} {v:.1f}" if "gemm" in k else f"copy {v:.2f} TB/s"
        for k, v in peaks.items()
    )


def chart(rows: list[dict], path: Path) -> str | None:
    """Bar chart of zeta-fused's speedup over each peer, per preset and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    groups = sorted({(r["preset"], r["mode"]) for r in rows if r.get("x_vs_fused")})
    peers = sorted({r["provider"] for r in rows if r.get("x_vs_fused") and r["provider"] != FUSED})
    if not groups or not peers:
        return "no fused timings: no chart"
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / len(peers)
    lookup = {(r["preset"], r["mode"], r["provider"]): r.get("x_vs_fused") for r in rows}
    for i, peer in enumerate(peers):
        values = [lookup.get((*g, peer)) or 0 for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=peer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{p}\n{m}" for p, m in groups], fontsize=7)
    ax.set_ylabel("zeta-fused speedup (x)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_json(rows: list[dict], meta: dict, peaks: dict, host: dict, out: Path,
               complete: bool = True, modelled: dict | None = None) -> Path:  # fmt: skip
    """bench.json; ``complete=False`` while the run is still going (raw timings only);
    ``modelled``: the subset presets' modelled figures."""
    out.mkdir(parents=True, exist_ok=True)
    verdicts = [asdict(v) for v in goals.judge(rows, host)] if complete else []
    doc = {"meta": meta, "complete": complete, "roofline": peaks, "host_overhead": host}
    doc["goals"] = verdicts
    doc["modelled"] = modelled or {}
    path = out / "bench.json"
    path.write_text(json.dumps(doc | {"results": rows}, indent=2) + "\n")
    return path


def write(rows: list[dict], meta: dict, peaks: dict, host: dict, out: Path,
          modelled: dict | None = None) -> list[str]:  # fmt: skip
    """Write bench.json, bench.md and (with fused timings) bench.png under ``out``."""
    write_json(rows, meta, peaks, host, out, modelled=modelled)
    (out / "bench.md").write_text(markdown(rows, meta, peaks, host, modelled))
    written = [str(out / "bench.json"), str(out / "bench.md")]
    note = chart(rows, out / "bench.png")
    return written + [f"(chart: {note})" if note else str(out / "bench.png")]
