"""Token subsets in the op: ``patch_embed(..., keep=ids)`` embeds only the patches ``ids`` (B, L)
names, each with its own position row, in the order given (repeats allowed): forward and every
gradient against the fp64 reference (the accuracy rule), against embed-everything-then-gather,
the op's eager math, determinism, compile, and the errors for bad indices."""

from __future__ import annotations

import pytest
import torch
from support import assert_accurate, assert_kernels_match_eager_math

from zeta_fused import Norm, patch_embed
from zeta_fused.functional import op_inputs
from zeta_fused.kernels.contract import LAYER_NORM, RMS_NORM
from zeta_fused.op.args import BwdArgs, Stem

TOKENS = 12  # a 3 x 4 grid of 4 x 4 patches per image
# keep: "subset" (MAE-style: a random half of each image's patches, shuffled), "repeats" (a
# patch kept twice in an image), "all" (every patch, reversed), "one".
KEEPS = {"subset": 6, "repeats": 7, "all": TOKENS, "one": 1}


def make_keep(kind: str, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    rows = [torch.randperm(TOKENS, generator=g)[: KEEPS[kind]] for _ in range(batch)]
    keep = torch.stack(rows)
    if kind == "repeats":
        keep[:, -1] = keep[:, 0]
    if kind == "all":
        keep = torch.arange(TOKENS - 1, -1, -1).expand(batch, -1).clone()
    return keep


def make_inputs(dim: int, kind: str, norms: str, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    k = 3 * 16

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def norm(size, eps):
        if norms == "none":
            return None
        kind_ = RMS_NORM if norms == "rms" else LAYER_NORM
        bias = None if norms == "rms" else 0.3 * randn(size)
        return Norm(kind_, 1 + 0.3 * randn(size), bias, eps)

    tensors = {"x": 3 * randn(batch, 3, 12, 16), "weight": randn(dim, k) / k**0.5,
               "bias": randn(dim), "pos": randn(TOKENS, dim), "prefix": randn(1, dim)}  # fmt: skip
    return tensors, (norm(k, 1e-5), norm(dim, 1e-4), norm(dim, 1e-6)), make_keep(kind, batch)


def run(tensors, norms, keep, dtype, device, backend):
    def on(t):
        return t.detach().to(device, dtype).requires_grad_()

    t = {n: on(v) for n, v in tensors.items()}
    n = [None if m is None else m._replace(weight=on(m.weight),
                                           bias=None if m.bias is None else on(m.bias))
         for m in norms]  # fmt: skip
    leaves = {**t}
    for name, m in zip(("pre", "post", "stem"), n, strict=True):
        if m is not None:
            leaves[f"{name}.weight"] = m.weight
            if m.bias is not None:
                leaves[f"{name}.bias"] = m.bias
    y = patch_embed(t["x"], 4, t["weight"], t["bias"], n[0], n[1], pos=t["pos"],
                    prefix=t["prefix"], stem_norm=n[2], keep=keep.to(device),
                    backend=backend)  # fmt: skip
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(device, y.dtype))
    return {"y": y, **dict(zip(leaves, grads, strict=True))}


@pytest.mark.parametrize("norms", ["ln", "rms", "none"])
@pytest.mark.parametrize("kind", KEEPS)
@pytest.mark.parametrize("dim", [40, 300], ids=["one tile", "wide rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_gradients(dim, kind, norms, dtype, device) -> None:
    tensors, n, keep = make_inputs(dim, kind, norms)
    ref = run(tensors, n, keep, torch.float64, "cpu", "eager")
    eager = run(tensors, n, keep, dtype, "cpu", "eager")
    fused = run(tensors, n, keep, dtype, device, "triton")
    assert fused["y"].shape == (3, 1 + keep.shape[1], dim)
    for name in ref:
        assert fused[name].dtype == eager[name].dtype, name
        assert_accurate(fused[name], eager[name], ref[name], dtype, f"{kind} {norms} {name}")


def test_equals_embedding_everything_then_gathering(device) -> None:
    """What MAE-style models do today: embed all patches (+ table), then gather the kept."""
    tensors, norms, keep = make_inputs(40, "subset", "ln")
    t = {n: v.float().to(device) for n, v in tensors.items()}
    pre, post = (m._replace(weight=m.weight.float().to(device), bias=m.bias.float().to(device))
                 for m in norms[:2])  # fmt: skip
    keep = keep.to(device)
    everything = patch_embed(t["x"], 4, t["weight"], t["bias"], pre, post, pos=t["pos"],
                             backend="eager")  # fmt: skip
    gathered = everything.gather(1, keep[..., None].expand(-1, -1, 40))
    subset = patch_embed(t["x"], 4, t["weight"], t["bias"], pre, post, pos=t["pos"], keep=keep,
                         backend="triton")  # fmt: skip
    torch.testing.assert_close(subset, gathered, rtol=1e-5, atol=1e-5)


def op_args(kind, device, dtype=torch.float64, requires_grad=False):
    tensors, norms, keep = make_inputs(300, kind, "ln")

    def on(t):
        return None if t is None else t.to(device, dtype).requires_grad_(requires_grad)

    norms = [m._replace(weight=on(m.weight), bias=on(m.bias)) for m in norms]
    stem = Stem(on(tensors["pos"]), on(tensors["prefix"]), norms[2])
    return op_inputs(on(tensors["x"]), (4, 4), on(tensors["weight"]), on(tensors["bias"]),
                     norms[0], norms[1], stem, keep.to(device))  # fmt: skip


@pytest.mark.parametrize("kind", ["subset", "repeats"])
def test_kernels_match_the_ops_eager_math(kind, device) -> None:
    args = op_args(kind, device)
    assert_kernels_match_eager_math(args)


def test_gradcheck(device) -> None:
    tensors, norms, keep = make_inputs(8, "repeats", "ln", batch=2)
    keep = keep.to(device)
    x, w, pos = (tensors[n].to(device).requires_grad_() for n in ("x", "weight", "pos"))

    def fn(x, w, pos):
        return patch_embed(x, 4, w, pos=pos, keep=keep, backend="triton")

    assert torch.autograd.gradcheck(fn, (x, w, pos), fast_mode=True)


def test_opcheck(device) -> None:
    args = op_args("subset", device, torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.zeta_fused.patch_embed_fwd.default, tuple(args))
    frozen = op_args("subset", device, torch.float32)
    y, stats = torch.ops.zeta_fused.patch_embed_fwd(*frozen)
    bwd = BwdArgs(torch.randn_like(y), stats, True, *frozen)
    torch.library.opcheck(torch.ops.zeta_fused.patch_embed_bwd.default, tuple(bwd))


def test_gradients_are_deterministic_with_repeats(device) -> None:
    tensors, norms, keep = make_inputs(300, "repeats", "ln")
    first = run(tensors, norms, keep, torch.float32, device, "triton")
    again = run(tensors, norms, keep, torch.float32, device, "triton")
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_compile_fullgraph(device, fused_calls) -> None:
    torch._dynamo.reset()
    tensors, _, keep = make_inputs(40, "subset", "none")
    w = tensors["weight"].float().to(device).requires_grad_()
    pos = tensors["pos"].float().to(device).requires_grad_()
    keep = keep.to(device)

    def stem(x, backend):
        return patch_embed(x, 4, w, pos=pos, keep=keep, backend=backend)

    x = tensors["x"].float().to(device)
    y = torch.compile(stem, fullgraph=True, backend="aot_eager")(x, "triton")
    assert fused_calls, "the compiled graph does not call the fused op"
    grads = torch.autograd.grad(y.square().sum(), (w, pos))
    y_ref = stem(x, "eager")
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (w, pos))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_indices_name_the_sizes(backend, device, fused_calls) -> None:
    tensors, _, keep = make_inputs(40, "subset", "none")
    x, w = tensors["x"].float().to(device), tensors["weight"].float().to(device)
    keep = keep.to(device)
    cases = {
        r"outside \[0, 12\) for the 12 patches": keep.masked_fill(keep == keep[0, 0], 12),
        r"outside \[0, 12\)": keep - 20,
        "keep must hold int64 indices, got torch.int32": keep.int(),
        r"shape \(B, L\) = \(3, L\) for a batch of 3, got \(2, 6\)": keep[:2],
        r"shape \(B, L\) = \(3, L\).*got \(18,\)": keep.flatten(),
    }
    for message, bad in cases.items():
        with pytest.raises((ValueError, TypeError), match=message):
            patch_embed(x, 4, w, keep=bad, backend=backend)
    assert not fused_calls, "nothing is computed for bad indices"


def test_model_made_indices_cost_no_host_sync(device) -> None:
    """The public API checks a user's indices against the grid (a host sync); a model's own
    index (fused_call: an argsort or topk it just made) is not read back on its per-call path,
    which CUDA-graph capture and throughput need."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from zeta_fused.functional import fused_call

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.syncs += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    tensors, _, keep = make_inputs(40, "subset", "none")
    x, w = tensors["x"].float().to(device), tensors["weight"].float().to(device)
    keep = keep.to(device)
    with Syncs() as user:
        patch_embed(x, 4, w, keep=keep, backend="triton")
    with Syncs() as model:
        fused_call(x, (4, 4), w, w.shape, None, keep=keep)
    assert user.syncs >= 1 and model.syncs == 0
    # A table index (SigLIP2's conversion: an arange into the resized tables) likewise.
    table = torch.randn(7, w.shape[0], device=device)
    index = torch.randint(0, 7, (x.shape[0], 12), device=device)  # 3 x 4 patches
    with Syncs() as user:
        patch_embed(x, 4, w, pos=table, pos_index=index, backend="triton")
    with Syncs() as model:
        fused_call(x, (4, 4), w, w.shape, None, stem=Stem(table, None, None, index))
    assert user.syncs >= 1 and model.syncs == 0
