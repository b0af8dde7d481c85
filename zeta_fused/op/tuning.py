"""Opt-in tuning of the fused op per call shape (docs/design.md, "Tuning").

Off by default, like ``torch.backends.cudnn.benchmark``: ``zeta_fused.tuning(True)`` or
``ZETA_FUSED_TUNING=1``. Then the first call of each kind (shapes, strides, dtypes, norms, stem
parts, device) times, on its own inputs, the forward under the device's launch policy and a few
alternative block sizes that fit the device's shared memory, then (when the call trains) the
backward likewise, and the eager path (``reference.reference_call``, with its autograd backward
when training), and keeps the fastest: a tuned call is never slower than the eager one. The
choices are kept per process and on disk, in one file per GPU name, driver, torch, Triton and
zeta-fused version, so they are measured once per machine and software stack.

Timing never runs inside a ``torch.compile`` trace, during CUDA-graph capture, or on tensors
that are not plain (FakeTensor, dispatch modes): those calls use choices made before, or the
device's policy. Choices live in a process-wide table behind a lock; each call reads what it
needs into its own locals, so modules shared between threads keep no per-call state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from ..dispatch import env_setting, interpreting
from . import devices, policy
from .args import TENSOR_FIELDS, BwdArgs, FwdArgs
from .policy import LaunchPolicy
from .tuning_file import (  # noqa: F401 (CACHE_ENV, cache_dir: the module's interface)
    CACHE_ENV,
    FILE_FORMAT,
    cache_dir,
    cache_file,
    device_name,
    driver_version,
    identity,
    read_choices,
)

ENV_VAR = "ZETA_FUSED_TUNING"
EAGER = "eager"
FUSED = "fused"
DEVICE = "device"  # the device's own policy

# Alternatives to the device policy, as changes of the call's Blocks table (one thing at a
# time, as bench.tune varies them); those whose tiles would not fit the device are skipped.
FWD_CANDIDATES: dict[str, Callable] = {
    DEVICE: lambda _: {},
    "n/2": lambda b: {"fwd_n": b.fwd_n // 2},
    "k*2": lambda b: {"fwd_k": b.fwd_k * 2},
    "single tiles": lambda _: {"fwd_pair": False},
    "n*2 single": lambda b: {"fwd_n": b.fwd_n * 2, "fwd_pair": False},
    "m/2": lambda b: {"fwd_m": b.fwd_m // 2},
    "warps/2": lambda b: {"fwd_warps": b.fwd_warps // 2},
    "stages+1": lambda b: {"fwd_stages": b.fwd_stages + 1},
}
BWD_CANDIDATES: dict[str, Callable] = {
    DEVICE: lambda _: {},
    "dz_n/2": lambda b: {"dz_n": b.dz_n // 2},
    "dw_d/2": lambda b: {"dw_d": b.dw_d // 2},
    "dw_m/2": lambda b: {"dw_m": b.dw_m // 2},
    "warps/2": lambda b: {"warps": b.warps // 2},
    "stages+1": lambda b: {"stages": b.stages + 1},
}
TIMED_RUNS = 5
# What a disk file may hold for each phase; None: every candidate failed (the device's policy).
PHASE_CHOICES = {"fwd": {*FWD_CANDIDATES, None}, "bwd": {*BWD_CANDIDATES, None},
                 "bwd+x": {*BWD_CANDIDATES, None}} | {
    f"path:{mode}": {EAGER, FUSED} for mode in ("inference", "training", "training+x")}  # fmt: skip

_enabled: bool | None = None  # None: ZETA_FUSED_TUNING not read yet
_lock = threading.RLock()
# (device name, phase, call key) -> choice; phases: "fwd", "bwd", "bwd+x", "path:<mode>"
_choices: dict[tuple[str, str, str], str] = {}
_loaded: set[str] = set()  # device names whose disk file was read
_made: dict[tuple, LaunchPolicy] = {}  # (base policy, itemsize, candidate) -> policy


# The spellings of ZETA_FUSED_TUNING, as the usual boolean environment variables take them.
ENV_SETTINGS = {**dict.fromkeys(("1", "true", "yes", "on"), True),
                **dict.fromkeys(("0", "false", "no", "off"), False)}  # fmt: skip


def tuning(enabled: bool | None = None) -> bool:
    """Turn tuning on (``True``) or off (``False``); returns whether it is on. Off by default;
    the environment variable ``ZETA_FUSED_TUNING`` (``1``, ``true``, ``yes``, ``on``; ``0``,
    ``false``, ``no``, ``off``; anything else warns and counts as off) sets it at the first
    query."""
    global _enabled
    if enabled is not None:
        _enabled = bool(enabled)
    elif _enabled is None:
        _enabled = env_setting(ENV_VAR, ENV_SETTINGS, False, stacklevel=2)
    return _enabled


def _time_ms(label: str, fn: Callable[[], object], cuda: bool) -> float:
    """Median milliseconds of ``fn`` after one untimed run (its compile). Tests replace it."""
    del label  # the stand-in timers of the tests tell candidates apart by it
    fn()
    times = []
    for _ in range(TIMED_RUNS):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:  # the CPU interpreter: tuning runs (tests) but its times mean nothing
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def may_time(x: Tensor) -> bool:
    """Whether a call on ``x`` may run timings now: a plain tensor, no dispatch mode, not
    traced by torch.compile, not inside CUDA-graph capture."""
    if torch.compiler.is_compiling() or type(x) is not Tensor:
        return False
    if torch._C._len_torch_dispatch_stack() or _capturing(x):
        return False
    return x.is_cuda or interpreting()


def _capturing(x: Tensor) -> bool:
    """Inside CUDA-graph capture on ``x``'s device (where nothing may be synchronised)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def call_key(a: FwdArgs) -> str:
    """What makes two calls launch the same kernels on the same work: shapes, strides and
    dtypes of every tensor (None: absent), the norm kinds, the patch, the GEMM and output
    dtypes, and TF32 for fp32 GEMMs."""
    from .plan import tf32_allowed

    parts = [
        "-" if t is None else f"{tuple(t.shape)}/{t.stride()}/{t.dtype}".replace("torch.", "")
        for t in (getattr(a, name) for name in TENSOR_FIELDS)
    ]
    tf32 = a.compute_dtype == torch.float32 and tf32_allowed()
    parts += [a.pre_norm, a.post_norm, a.stem_norm, str(tuple(a.patch)),
              str(a.compute_dtype).replace("torch.", ""), str(a.out_dtype).replace("torch.", ""),
              "tf32" if tf32 else "ieee"]  # fmt: skip
    return "|".join(parts)


def mode_of(a: FwdArgs) -> str:
    """ "inference", "training" or "training+x" (the image needs a gradient too)."""
    if not torch.is_grad_enabled():
        return "inference"
    tensors = [t for t in a if isinstance(t, Tensor)]
    if not any(t.requires_grad for t in tensors):
        return "inference"
    return "training+x" if a.x.requires_grad else "training"


def bwd_phase(needs_x_grad: bool) -> str:
    """The backward's phase name: its kernels differ when the image gradient is computed."""
    return "bwd+x" if needs_x_grad else "bwd"


# --- the disk file ---------------------------------------------------------------------------


def _load(name: str) -> None:
    """Read the device's disk file into the table once. What this build cannot use is ignored
    and its calls tuned again: a file :func:`read_choices` refuses, and every choice of a kind of
    call with an entry this build does not know (another build with the same version string
    may have other candidates: PHASE_CHOICES)."""
    if name in _loaded:
        return
    with _lock:
        if name in _loaded:
            return
        doc = read_choices(cache_file(identity(name)), identity(name))
        by_call: dict[str, dict] = {}
        for key, entry in ({} if doc is None else doc["choices"]).items():
            phase, _, call = key.partition(" ")
            by_call.setdefault(call, {})[phase] = isinstance(entry, dict) and entry.get("choice")
        for call, got in by_call.items():
            usable = all(isinstance(c, str | None) and c in PHASE_CHOICES.get(p, ())
                         for p, c in got.items())  # fmt: skip
            for phase, choice in got.items() if usable else ():
                if choice is not None:
                    _choices.setdefault((name, phase, call), choice)
        _loaded.add(name)


def _save(name: str, measured: dict[tuple[str, str], dict]) -> None:
    """Add choices and their timings to the device's disk file (merged with what another
    process wrote meanwhile; written to a temporary file, then renamed into place)."""
    ident = identity(name)
    path = cache_file(ident)
    doc = read_choices(path, ident) or {"format": FILE_FORMAT, "identity": ident, "choices": {}}
    for (phase, call), entry in measured.items():
        doc["choices"][f"{phase} {call}"] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache keeps the choices for this process only


# --- policies of the candidates ------------------------------------------------------------------


def candidate_policy(base: LaunchPolicy, itemsize: int, name: str, phase: str) -> LaunchPolicy:
    """``base`` with candidate ``name`` of ``phase`` ("fwd" or "bwd") applied to the Blocks
    table of ``itemsize``-byte GEMM operands (one object per combination)."""
    key = (base, itemsize, name, phase)
    pol = _made.get(key)
    if pol is None:
        field = "blocks_16bit" if itemsize <= 2 else "blocks_32bit"
        table = FWD_CANDIDATES if phase == "fwd" else BWD_CANDIDATES
        blocks = getattr(base, field)
        changed = dataclasses.replace(blocks, **table[name](blocks))
        pol = _made.setdefault(key, dataclasses.replace(base, **{field: changed}))
    return pol


def candidates(base: LaunchPolicy, itemsize: int, phase: str, x: Tensor) -> list[str]:
    """The candidates of ``phase`` whose tiles are valid and fit the device's shared memory."""
    table = FWD_CANDIDATES if phase == "fwd" else BWD_CANDIDATES
    field = "blocks_16bit" if itemsize <= 2 else "blocks_32bit"
    limits = None
    if x.is_cuda:
        limits = devices.limits_of(torch.cuda.get_device_properties(x.device))
    names = []
    for name in table:
        blocks = getattr(candidate_policy(base, itemsize, name, phase), field)
        if min(blocks.sizes()) < devices.MIN_BLOCK or min(blocks.counts()) < 1:
            continue
        if limits is not None:
            arch, _, smem = limits
            pol = candidate_policy(base, itemsize, name, phase)
            if max(devices.policy_estimates(pol, field, arch).values()) > smem:
                continue
        names.append(name)
    return names


def chosen_policy(a: FwdArgs, phase: str) -> LaunchPolicy:
    """The launch policy of a call: the block sizes chosen for calls like it (``phase``:
    "fwd", "bwd", or "bwd+x" with the image gradient), else the device's. Never times."""
    base = policy.for_tensor(a.x)
    name = device_name(a.x)
    _load(name)
    choice = _choices.get((name, phase, call_key(a)))
    if choice is None:
        return base
    return candidate_policy(base, a.compute_dtype.itemsize, choice, phase[:3])


# --- timing ----------------------------------------------------------------------------------


def path_for(a: FwdArgs) -> str:
    """EAGER or FUSED: how this call runs. The first call of its kind in its mode
    (inference, training) is tuned here when it may time (:func:`may_time`); calls that may
    not use what was chosen before, else the fused op."""
    name = device_name(a.x)
    _load(name)
    mode, key = mode_of(a), call_key(a)
    path = _choices.get((name, f"path:{mode}", key))
    if path is None:
        if not may_time(a.x):
            return FUSED
        with _lock:  # one thread tunes a kind of call; the others wait, then read its choice
            path = _choices.get((name, f"path:{mode}", key))
            if path is None:
                path = _tune(a, name, mode, key)
    return path


def _tune(a: FwdArgs, name: str, mode: str, key: str) -> str:
    """Time the call's candidates and the eager path; record and save the choices. A candidate
    that fails (an estimate that missed, a compile error) is reported in the file and not
    chosen; with no fused candidate left, the call runs eager."""
    from . import launch
    from .reference import reference_call

    cuda, itemsize = a.x.is_cuda, a.compute_dtype.itemsize
    base = policy.for_tensor(a.x)
    measured: dict[tuple[str, str], dict] = {}

    def best(phase: str, run: Callable[[LaunchPolicy], object]) -> tuple[str | None, float]:
        known = _choices.get((name, phase, key))
        ms, failed = {}, {}
        for n in [known] if known else candidates(base, itemsize, phase[:3], a.x):
            pol = candidate_policy(base, itemsize, n, phase[:3])
            try:
                ms[n] = _time_ms(f"{phase} {n}", lambda pol=pol: run(pol), cuda)
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is not chosen
                failed[n] = f"{type(exc).__name__}: {exc}"[:300]
        choice = min(ms, key=ms.get) if ms else None
        if not known:
            if choice is not None:
                _choices[(name, phase, key)] = choice
            measured[(phase, key)] = {"choice": choice, "ms": ms, "failed": failed}
        return choice, ms.get(choice, math.inf)

    training, grad_y = mode != "inference", None
    with torch.no_grad():
        fwd, fused_ms = best("fwd", lambda pol: launch.patch_embed_fwd(a, pol))
        if training and fwd is not None:
            y, stats = launch.patch_embed_fwd(a, candidate_policy(base, itemsize, fwd, "fwd"))
            grad_y = torch.ones_like(y)
            bwd_args = BwdArgs(grad_y, stats, mode == "training+x", *a)
            phase = bwd_phase(mode == "training+x")
            fused_ms += best(phase, lambda pol: launch.patch_embed_bwd(bwd_args, pol))[1]
        elif training:  # no fused forward ran: the eager backward still needs a gradient
            grad_y = torch.ones_like(reference_call(a))

    def eager() -> None:
        with torch.set_grad_enabled(training):
            out = reference_call(a)
            if training:
                inputs = [t for t in a if isinstance(t, Tensor) and t.requires_grad]
                torch.autograd.grad(out, inputs, grad_y)

    eager_ms = _time_ms(f"path:{mode} {EAGER}", eager, cuda)
    path = EAGER if eager_ms < fused_ms else FUSED
    _choices[(name, f"path:{mode}", key)] = path
    fused = None if math.isinf(fused_ms) else fused_ms
    measured[(f"path:{mode}", key)] = {"choice": path, "ms": {FUSED: fused, EAGER: eager_ms}}
    _save(name, measured)
    return path
