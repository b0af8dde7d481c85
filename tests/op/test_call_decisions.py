"""The launchers' decisions, made once per call signature (op/launch_fwd.py and
op/launch_bwd.py, docs/design.md "Host path"): a call that looks its decisions up gets exactly
those it would make afresh, and every input the decisions read is part of the signature."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from zeta_fused.functional import op_inputs
from zeta_fused.kernels.contract import LAYER_NORM, RMS_NORM, STAT_ROWS
from zeta_fused.op import launch_bwd, launch_fwd, policy
from zeta_fused.op.args import BwdArgs, Norm, Stem

D, C, P = 40, 3, 4
K = C * P * P


def _image(layout: str, dtype: torch.dtype, batch: int = 2) -> torch.Tensor:
    x = torch.randn(batch, C, 8, 12, dtype=dtype)
    if layout == "channels last":
        return x.to(memory_format=torch.channels_last)
    if layout == "cropped":  # a view with row strides of the wider image
        return torch.randn(batch, C, 8, 16, dtype=dtype)[..., 2:14]
    return x


def _weight(kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "conv":
        return torch.randn(D, C, P, P, dtype=dtype)
    if kind == "transposed":
        return torch.randn(K, D, dtype=dtype).t()
    return torch.randn(D, K, dtype=dtype)


def _norm(kind: str | None, size: int, dtype: torch.dtype, bias: bool = True) -> Norm | None:
    if kind is None:
        return None
    b = torch.randn(size, dtype=dtype) if bias and kind == LAYER_NORM else None
    return Norm(kind, torch.randn(size, dtype=dtype), b, 1e-5)


# Every input the decisions could read, each with the values that change something.
AXES = {
    "x": ["contiguous", "channels last", "cropped"],
    "dtype": [torch.float32, torch.bfloat16],
    "weight": ["linear", "conv", "transposed"],
    "bias": [True, False],
    "pre": [None, LAYER_NORM, RMS_NORM, "ln without bias"],
    "post": [None, LAYER_NORM],
    "stem": [None, RMS_NORM],
    "pos": [False, True],
    "prefix": [0, 2],
    "keep": [None, 3],
    "batch": [1, 2],
}


def _args(choice: dict):
    dtype = choice["dtype"]
    x = _image(choice["x"], dtype, choice["batch"])
    pre = choice["pre"]
    pre_norm = (_norm(LAYER_NORM, K, dtype, bias=False) if pre == "ln without bias"
                else _norm(pre, K, dtype))  # fmt: skip
    n = 6
    pos = torch.randn(n, D, dtype=dtype) if choice["pos"] else None
    prefix = torch.randn(choice["prefix"], D, dtype=dtype) if choice["prefix"] else None
    stem = Stem(pos, prefix, _norm(choice["stem"], D, dtype))
    keep = None
    if choice["keep"]:
        keep = torch.stack([torch.randperm(n)[: choice["keep"]] for _ in range(x.shape[0])])
    bias = torch.randn(D, dtype=dtype) if choice["bias"] else None
    return op_inputs(x, (P, P), _weight(choice["weight"], dtype), bias, pre_norm,
                     _norm(choice["post"], D, dtype), stem, keep)  # fmt: skip


def _choices(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{axis: rng.choice(values) for axis, values in AXES.items()} for _ in range(count)]


POLICIES = {
    "default": {},
    "small tiles, shared rows": dict(
        small_grid=2**31, fwd_target_programs=2**20,
        blocks_16bit=dict(fwd_small_m=16, fwd_small_n=16, fwd_k=16),
        blocks_32bit=dict(fwd_small_m=16, fwd_small_n=16, fwd_k=16),
    ),
    "no cuBLAS path, no relayout": dict(cublas_plain_gemm=False, relayout_min_tokens=0),
}  # fmt: skip


def test_looked_up_decisions_are_the_fresh_ones() -> None:
    """Calls of many signatures under several policies, each with and without statistics,
    all made first: each one's looked-up decisions equal those made afresh for it."""
    launch_fwd._calls.clear()
    cases = [_args(c) for c in _choices(60)]
    for changes in POLICIES.values():
        with policy.override(**changes):
            pol = policy.DEFAULT if not changes else policy.for_tensor(cases[0].x)
            for a, stats in itertools.product(cases, (True, False)):
                launch_fwd.fwd_call(a, pol, stats)
            for a, stats in itertools.product(cases, (True, False)):
                assert launch_fwd.fwd_call(a, pol, stats) == launch_fwd._decide(a, pol, stats)


def _elsewhere(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its strides, at another address."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def test_one_signature_one_set_of_decisions() -> None:
    """Calls with the same signature make the same decisions afresh: nothing the decisions
    read is left out of it (pairs of random calls, and each call against copies of its
    tensors at other addresses)."""
    pol = policy.DEFAULT
    cases = [_args(c) for c in _choices(150, seed=1)]
    by_key: dict[tuple, object] = {}
    for a in cases:
        decided = launch_fwd._decide(a, pol, True)
        key = launch_fwd.signature(a, pol, True)
        assert by_key.setdefault(key, decided) == decided
        moved = a._replace(**{f: _elsewhere(getattr(a, f)) for f in ("x", "weight")})
        assert launch_fwd.signature(moved, pol, True) == key
        assert launch_fwd._decide(moved, pol, True) == decided


def test_every_input_that_changes_a_decision_changes_the_signature() -> None:
    """From random calls, each axis changed alone: where the decisions made afresh differ, so
    do the signatures (a signature missing an input would look up another call's)."""
    pol = policy.DEFAULT
    for base in _choices(12, seed=2):
        a = _args(base)
        decided, key = launch_fwd._decide(a, pol, True), launch_fwd.signature(a, pol, True)
        for axis, values in AXES.items():
            for value in values:
                other = _args(base | {axis: value})
                if launch_fwd._decide(other, pol, True) != decided:
                    assert launch_fwd.signature(other, pol, True) != key, (base, axis, value)


def test_matmul_precision_is_part_of_the_signature() -> None:
    """fp32 GEMMs follow torch's matmul precision (TF32 only when allowed), read per call."""
    choice = {axis: values[0] for axis, values in AXES.items()}
    a = _args(choice | dict(dtype=torch.float32, post=LAYER_NORM))
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        ieee = launch_fwd.fwd_call(a, policy.DEFAULT, False).main_consts["DOT_PRECISION"]
        matmul.fp32_precision = "tf32"
        tf32 = launch_fwd.fwd_call(a, policy.DEFAULT, False).main_consts["DOT_PRECISION"]
    finally:
        matmul.fp32_precision = before
    assert (ieee, tf32) == ("ieee", "tf32")


def test_too_many_tokens_is_refused_every_call() -> None:
    """A call the kernels cannot take raises each time (no decision is kept for it)."""
    x = torch.zeros(1, dtype=torch.bfloat16).as_strided((launch_fwd.MAX_TOKENS, 1, 1, 1),
                                                         (0, 0, 0, 0))  # fmt: skip
    a = op_inputs(x, (1, 1), torch.randn(4, 1, dtype=torch.bfloat16), None, None, None)
    for _ in range(2):
        with pytest.raises(ValueError, match="tokens"):
            launch_fwd.fwd_call(a, policy.DEFAULT, False)


# The backward's own inputs: the upstream gradient's layout.
GRAD_LAYOUTS = ["contiguous", "broadcast", "strided"]


def _bwd(a, grad: str = "contiguous"):
    """(BwdArgs, rows, tokens) of the backward of forward inputs ``a``."""
    rows = a.keep.shape[1] if a.keep is not None else launch_fwd._decide(
        a, policy.DEFAULT, False).rows  # fmt: skip
    n_prefix = 0 if a.prefix is None else a.prefix.shape[0]
    shape = (a.x.shape[0], n_prefix + rows, a.weight.shape[0])
    dy = torch.randn(shape, dtype=a.out_dtype)
    if grad == "broadcast":
        dy = torch.ones((), dtype=a.out_dtype).expand(shape)
    elif grad == "strided":
        dy = torch.randn(shape[0], shape[1], 2 * shape[2], dtype=a.out_dtype)[..., ::2]
    tokens = a.x.shape[0] * rows
    acc = torch.float64 if a.compute_dtype == torch.float64 else torch.float32
    stats = torch.empty(len(STAT_ROWS), tokens, dtype=acc)
    return BwdArgs(dy, stats, True, *a), rows, tokens


def test_backward_looked_up_decisions_are_the_fresh_ones() -> None:
    launch_bwd._decided.clear()
    calls = [_bwd(_args(c), g) for c in _choices(40, seed=3) for g in GRAD_LAYOUTS[::2]]
    for changes in POLICIES.values():
        with policy.override(**changes):
            pol = policy.for_tensor(calls[0][0].x)
            for args, rows, tokens in calls:
                launch_bwd.bwd_decisions(args, pol, rows, tokens)
            for args, rows, tokens in calls:
                assert launch_bwd.bwd_decisions(args, pol, rows, tokens) == launch_bwd._decide(
                    args, pol, rows, tokens)  # fmt: skip


def test_backward_inputs_that_change_a_decision_change_the_signature() -> None:
    """As for the forward, with the upstream gradient's layout as one more axis; and the same
    call with its tensors at other addresses has the same signature and decisions."""
    pol = policy.DEFAULT
    for base in _choices(10, seed=4):
        args, rows, tokens = _bwd(_args(base))
        decided = launch_bwd._decide(args, pol, rows, tokens)
        key = launch_bwd.signature(args, pol)
        moved = args._replace(x=_elsewhere(args.x), weight=_elsewhere(args.weight),
                              grad_y=_elsewhere(args.grad_y))  # fmt: skip
        assert launch_bwd.signature(moved, pol) == key
        assert launch_bwd._decide(moved, pol, rows, tokens) == decided
        changes = [(axis, {axis: v}, "contiguous") for axis, vs in AXES.items() for v in vs]
        changes += [("grad", {}, g) for g in GRAD_LAYOUTS]
        for axis, change, grad in changes:
            other, o_rows, o_tokens = _bwd(_args(base | change), grad)
            if launch_bwd._decide(other, pol, o_rows, o_tokens) != decided:
                assert launch_bwd.signature(other, pol) != key, (base, axis, change, grad)
