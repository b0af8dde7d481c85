"""The host path of a fused call (docs/design.md, "Host path"), on any machine: eager calls skip
the dispatcher, and what each forward and backward launches.

Counted per forward and per backward, for ``PatchEmbeddings`` and a converted timm ViT stem:
Triton launches, and the torch ops that launch a kernel on a GPU (allocations, views and
metadata left out; backward with gradients None, so without autograd's own accumulation); and
for ``PatchEmbeddings`` the allocations (one workspace per call for its kernels' scratch).
The counts asserted are today's. Issue 30's targets: a forward in at most 2 launches, a
training backward in at most 3 (2 without the image gradient), and no kernel-launching torch op
besides allocation. Met for PatchEmbeddings; a whole stem's prefix rows still add torch ops (their
(P, D) problem in eager math).
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from support import make, module_op_inputs, randomise
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode_temporarily

import zeta_fused.functional as functional
from zeta_fused import ViTStem, fuse_stems
from zeta_fused.op import policy, register

# aten ops that launch no kernel on a GPU: allocation, views, metadata.
NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "as_strided", "select", "slice", "alias", "expand", "t", "transpose",
    "permute", "unsqueeze", "squeeze", "detach", "reshape", "unflatten", "split",
    "split_with_sizes", "chunk", "unbind", "narrow", "view_as", "lift_fresh", "_reshape_alias",
    "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size",
}  # fmt: skip
# Of those, the ones that allocate memory (each costs about a bound launch's host time).
ALLOCATING = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class KernelCount(TorchDispatchMode):
    """Counts, while active, the torch ops that launch a kernel and the Triton launches.

    A dispatch mode makes fused calls take the custom op (the mode would see it, not the ops
    its implementation runs): ``register.dispatcher_free`` ignores this one, so that calls
    take their eager path and the mode sees every op of it."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.launches: collections.Counter = collections.Counter()
        self.allocations = 0  # since the last take (the interpreter's own copies left out)
        self.launching = False  # inside a launch: the interpreter's own copies are not counted
        real = register.dispatcher_free

        def ignoring_me(x):
            if torch._C._len_torch_dispatch_stack() == 1 and isinstance(
                torch.utils._python_dispatch._get_current_dispatch_mode(), KernelCount
            ):
                with _pop_mode_temporarily():
                    return real(x)
            return real(x)

        monkeypatch.setattr(register, "dispatcher_free", ignoring_me)
        monkeypatch.setattr(functional, "dispatcher_free", ignoring_me)
        from zeta_fused.op import launch

        for name, kernel in list(vars(launch).items()):
            if hasattr(kernel, "fn") and hasattr(kernel, "__getitem__"):  # a Triton kernel
                monkeypatch.setattr(launch, name, _Counted(kernel, name, self))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL and not self.launching:
            self.ops[name] += 1
        if name in ALLOCATING and not self.launching:
            self.allocations += 1
        return func(*args, **(kwargs or {}))

    def take(self) -> tuple[int, dict]:
        """(Triton launches, kernel-launching torch ops by name) since the last take."""
        launches, ops = sum(self.launches.values()), dict(self.ops)
        self.launches.clear()
        self.ops.clear()
        self.taken_allocations, self.allocations = self.allocations, 0
        return launches, ops


class _Counted:
    def __init__(self, kernel, name: str, count: KernelCount) -> None:
        self.kernel, self.name, self.count = kernel, name, count

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def counted(*args, **kwargs):
            self.count.launches[self.name] += 1
            self.count.launching = True
            try:
                return run(*args, **kwargs)
            finally:
                self.count.launching = False

        return counted


@pytest.fixture
def count(monkeypatch) -> KernelCount:
    return KernelCount(monkeypatch)


def step_counts(count: KernelCount, forward, params):
    """(forward, backward) counts of one training step, gradients None before it."""
    for p in params:
        p.grad = None
    dy = torch.ones_like(forward())
    count.take()
    with count:
        y = forward()
        fwd = count.take()
        y.backward(dy)
        bwd = count.take()
    return fwd, bwd


@pytest.mark.parametrize("image_grad", [False, True], ids=["params", "params+image"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patch_embeddings_launches_and_torch_ops(count, device, dtype, image_grad) -> None:
    """Two launches (the weight fold of the pre-norm, the main kernel) and no other kernel per
    forward. Per backward the dZ and dW kernels (and the image's), and no other kernel: the
    second stage of every sum and the casts to a bf16 parameter's dtype are in the dW kernel."""
    m = make(3, 32, 8).to(device, dtype)
    m.backend = "triton"
    x = torch.randn(2, 3, 16, 16, device=device, dtype=dtype, requires_grad=image_grad)
    with torch.no_grad(), count:
        m(x)
    assert count.take() == (2, {})
    (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = step_counts(
        count, lambda: m(x), [*m.parameters(), x]
    )
    assert (fwd_launches, fwd_ops) == (2, {})
    assert (bwd_launches, bwd_ops) == (2 + image_grad, {})


def test_batch_one_rows_shared_by_programs(count, device) -> None:
    """A batch-1 call leaves the GPU idle with one program per row block: programs share the
    row blocks (two here), and the last of each to arrive finishes its rows. Still the fold
    and the main kernel alone, and no other kernel, forward and backward."""
    from zeta_fused.op import launch_fwd

    m = make(3, 128, 8).to(device, torch.bfloat16)
    m.backend = "triton"
    x = torch.randn(1, 3, 16, 16, device=device, dtype=torch.bfloat16)
    with torch.no_grad(), count:
        m(x)
    assert count.take() == (2, {})
    a = module_op_inputs(m, x)
    assert launch_fwd.fwd_call(a, policy.for_tensor(x), False).shared
    (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = step_counts(
        count, lambda: m(x), list(m.parameters())
    )
    assert (fwd_launches, fwd_ops, bwd_launches, bwd_ops) == (2, {}, 2, {})


@pytest.mark.parametrize("image_grad", [False, True], ids=["params", "params+image"])
def test_one_workspace_per_call(count, device, image_grad) -> None:
    """A call allocates what leaves it and one workspace for all its kernels pass each other
    (op/workspace.py): a batch-1 forward under no_grad its output and the workspace (the
    folded weight, its row sums, b', the row counters and partials), with autograd also the
    row statistics; a backward the six parameters' gradients (and the image's) and the
    workspace (dZ, column partials, row offsets, centring sums, counters, G per split)."""
    m = make(3, 128, 8).to(device, torch.bfloat16)
    m.backend = "triton"
    x = torch.randn(1, 3, 16, 16, device=device, dtype=torch.bfloat16,
                    requires_grad=image_grad)  # fmt: skip
    with torch.no_grad(), count:
        m(x)
    count.take()
    assert count.taken_allocations == 2
    for p in (*m.parameters(), x):
        p.grad = None
    dy = torch.ones(1, 4, 128, device=device, dtype=torch.bfloat16)
    with count:
        y = m(x)
        count.take()
        assert count.taken_allocations == 3
        y.backward(dy)
        count.take()
        assert count.taken_allocations == 6 + 1 + image_grad


def timm_stem(device: str):
    vit = pytest.importorskip("timm.models.vision_transformer")
    model = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=0, num_heads=2,
                                  num_classes=0, pre_norm=True, reg_tokens=2,
                                  final_norm=False)  # fmt: skip
    model = randomise(model).to(device)
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    return model, before


def test_timm_stem_launches_and_torch_ops(count, device) -> None:
    """A converted timm ViT stem (class and register tokens, a position table covering them,
    norm_pre): the whole stem in one launch per forward, prefix rows included (the kernel's
    programs after the tokens' write them); the only torch ops per forward make the prefix
    rows from the tokens and their position rows (a concatenation and a sum). Two launches
    per backward, the prefix rows' gradients included (one more program of the dZ kernel);
    the only torch op is the concatenation of the table's two parts' gradients."""
    model, before = timm_stem(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        want = before.forward_features(x)
        with count:
            got = model.forward_features(x)
    torch.testing.assert_close(got, want)
    launches, ops = count.take()
    assert (launches, ops) == (1, {"cat": 1, "add": 1})
    (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = step_counts(
        count, lambda: model.forward_features(x), list(model.parameters())
    )
    assert (fwd_launches, fwd_ops) == (1, {"cat": 1, "add": 1})
    assert (bwd_launches, bwd_ops) == (2, {"cat": 1}), bwd_ops
    # Indexing the table or the tokens would add a zero fill and a copy per index.
    assert not {"select_backward", "slice_backward"} & set(bwd_ops), bwd_ops


def test_eager_calls_skip_the_dispatcher(device, monkeypatch) -> None:
    """An eager call runs the op's implementation without the dispatcher: directly under
    no_grad, through its autograd as a plain autograd.Function with autograd (torch's wrapper
    of a custom op's autograd rebuilds the 22-argument schema once per argument on every
    call), backward included. Under a dispatch mode the custom ops run, as torch.compile and
    torch.export record them. The same outputs and gradients either way."""
    import torch._library.utils as library_utils

    calls: collections.Counter = collections.Counter()

    def counting(module, name: str, label: str) -> None:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.update([label]) or real(*a, **k))

    counting(functional, "patch_embed_fwd", "fwd op")
    counting(functional, "patch_embed_autograd", "autograd.Function")
    counting(register, "patch_embed_bwd", "bwd op")
    counting(library_utils, "fill_defaults", "fill_defaults")
    m = make(3, 16, 4).to(device, torch.float32)
    m.backend = "triton"
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    dy = torch.randn(2, 4, 16, device=device)
    with torch.no_grad():
        fast = m(x)
    assert not calls
    y = m(x)
    y.backward(dy)
    eager_grads = [t.grad.clone() for t in (x, *m.parameters())]
    assert calls == {"autograd.Function": 1}, calls

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    for t in (x, *m.parameters()):
        t.grad = None
    calls.clear()
    with Passing():
        traced = m(x)
        traced.backward(dy)
    assert calls["fwd op"] == 1 and calls["bwd op"] == 1 and calls["fill_defaults"]
    torch.testing.assert_close(fast, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(traced, y, rtol=0, atol=0)
    for t, want in zip((x, *m.parameters()), eager_grads, strict=True):
        torch.testing.assert_close(t.grad, want, rtol=0, atol=0)


def vit_stem(device: str) -> ViTStem:
    return ViTStem(3, 32, 16, 8, num_prefix_tokens=2, stem_norm=True, backend="triton").to(device)


def test_vit_stem_table_and_prefix_reach_the_op_through_views(count, device) -> None:
    """ViTStem's (1, n, D) table and prefix tokens reach the op as rows through views: no zero
    fill and copy per backward for an index."""
    stem = vit_stem(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    (fwd_launches, _), (bwd_launches, bwd_ops) = step_counts(
        count, lambda: stem(x), list(stem.parameters())
    )
    assert fwd_launches == 2 and bwd_launches == 2  # forward: the fold of its pre-norm
    assert not {"select_backward", "slice_backward"} & set(bwd_ops), bwd_ops
