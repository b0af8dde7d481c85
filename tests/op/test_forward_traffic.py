"""The bytes the fused forward moves: bench/traffic.py's model of its loop structure against
the bytes the interpreter counts, and the model against the targets of docs/design.md
("Forward main loop") at the benchmark's preset sizes."""

from __future__ import annotations

import collections
import contextlib
import os

import numpy as np
import pytest
import torch

from bench.presets import PRESETS, Preset
from bench.traffic import forward_traffic
from zeta_fused import PatchEmbeddings
from zeta_fused.op import devices, launch, policy

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="counts the interpreter's loads and stores"
)
H100 = devices.for_target("sm_90")


def _extent(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return 0 if t.numel() == 0 else (last + 1) * t.element_size()


@contextlib.contextmanager
def counted_main_kernel():
    """Bytes each tensor argument of the forward's main kernel loads and stores, counted on
    every masked-on element the interpreter reads or writes: {(op, argument): bytes}."""
    from triton.runtime.interpreter import InterpreterBuilder

    counts: collections.Counter = collections.Counter()
    ranges: list[tuple[int, int, str]] = []
    real = launch._patch_embed_fwd_kernel
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def account(op, ptrs, mask):
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        addrs = np.asarray(ptrs.data)
        if mask is not None:
            addrs = addrs[np.broadcast_to(np.asarray(mask.data), addrs.shape)]
        for lo, hi, name in ranges:
            counts[(op, name)] += size * int(np.count_nonzero((addrs >= lo) & (addrs < hi)))

    class Counting:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                # Each tensor's own extent: the call's scratch parts are views of one workspace.
                ranges[:] = [
                    (t.data_ptr(), t.data_ptr() + _extent(t), name)
                    for name, t in zip(real.arg_names, args, strict=False)
                    if isinstance(t, torch.Tensor)
                ]
                try:
                    real[grid](*args, **kwargs)
                finally:
                    ranges.clear()

            return run

    def counting_load(self, ptrs, mask, *a, **kw):
        if ranges:
            account("loads", ptrs, mask)
        return load(self, ptrs, mask, *a, **kw)

    def counting_store(self, ptrs, value, mask, *a, **kw):
        if ranges:
            account("stores", ptrs, mask)
        return store(self, ptrs, value, mask, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "_patch_embed_fwd_kernel", Counting())
        mp.setattr(InterpreterBuilder, "create_masked_load", counting_load)
        mp.setattr(InterpreterBuilder, "create_masked_store", counting_store)
        yield counts


@pytest.mark.parametrize("dim", [512, 200], ids=["pairs of column tiles", "ragged tile"])
def test_the_model_is_what_the_kernel_moves(dim) -> None:
    """A vit_b16 stem at 64 x 64 under the H100 policy (wide tiles: two 128-token row blocks,
    12 K steps): the counted bytes of each operand are the model's."""
    p = Preset("counted", 16, 3, 64, 64, (16, 16), dim, "bf16")
    m = PatchEmbeddings(3, dim, patch_size=16, backend="triton").to(torch.bfloat16)
    x = torch.randn(p.batch, 3, 64, 64, dtype=torch.bfloat16)
    with policy.override(base=H100, small_grid=1), counted_main_kernel() as counts:
        with torch.no_grad():
            m(x)
        model = forward_traffic(p, policy.current())
    assert counts[("loads", "X")] == model["X loads"]
    assert counts[("loads", "W")] == model["W loads"]
    assert counts[("loads", "Y")] == model["Y loads"]
    assert counts[("stores", "Y")] == model["Y stores"]
    assert counts[("stores", "Stats")] == model["stats stores"] == 0  # inference keeps none


def test_vit_b16_forward_traffic() -> None:
    """The patches read once per pair of 128-column tiles (3 times for D = 768), the weight
    once per 128 tokens, every load within 900 MB (the register-normalising kernel loaded
    1,398 MB)."""
    p = PRESETS["vit_b16"]
    t = forward_traffic(p, H100)
    image = p.input_elems() * 2
    assert t["X loads"] <= 3 * image + p.batch * p.tokens * 2
    assert t["W loads"] <= p.dim * p.patch_dim * 2 * (p.batch * p.tokens // 128)
    loads = t["X loads"] + t["W loads"] + t["Y loads"] + t["vector loads"]
    assert loads <= 900e6, loads


def test_memory_bound_seed_example_traffic() -> None:
    """K = 48, D = 64: one tile holds every column; within 1.3x of the compulsory bytes."""
    t = forward_traffic(PRESETS["seed_doc_example"], H100)
    assert t["total"] <= 1.3 * t["compulsory"], t
