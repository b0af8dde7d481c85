"""Shared test support: the accuracy rule (docs/design.md, "Accuracy rule"), module
factories, and the forward and gradient checks against the fp64 reference.

Accuracy rule: fused error vs an fp64 reference <= 2x the eager error in the same dtype + atol.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zeta_fused import PatchEmbeddings, fuse_patch_embeddings
from zeta_fused.functional import op_inputs
from zeta_fused.kernels.contract import LAYER_NORM
from zeta_fused.op.args import FwdArgs, Norm

# The tests folder (scripts and data beside this file) and the repository root.
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def max_err(t: Tensor, ref: Tensor) -> float:
    return (t.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_accurate(fused: Tensor, eager: Tensor, ref: Tensor, dtype: torch.dtype, what: str = ""):
    """fused and eager in ``dtype``, ref in fp64; NaN only where the reference has it."""
    assert fused.shape == ref.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref.shape)}"
    ref = ref.detach().double().cpu()
    fused, eager = fused.detach().double().cpu(), eager.detach().double().cpu()
    nan = ref.isnan()
    assert torch.equal(fused.isnan(), nan), f"{what}: NaN pattern differs from the reference"
    if nan.all():
        return
    keep = ~nan
    fused_err = max_err(fused[keep], ref[keep])
    eager_err = max_err(eager[keep], ref[keep])
    bound = 2 * eager_err + ATOL[dtype]
    assert fused_err <= bound, (
        f"{what}: fused error {fused_err:.3g} > {bound:.3g} (eager {eager_err:.3g})"
    )


# Images on which a norm folded out of a GEMM could cancel (kernels/projection.py).
HOSTILE = ("raw pixels", "flat patches", "near-constant", "letterboxed", "outlier pivot")


def hostile_image(kind: str) -> Tensor:
    """A (2, 3, 16, 16) fp64 image of one of the HOSTILE kinds."""
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    if kind == "raw pixels":  # 0..255 images: |mean| / std ~ 6
        return torch.randint(0, 256, x.shape).double()
    if kind == "flat patches":  # |mean| / std ~ 1e3, where mean * s cancels most of the product
        return 500.0 + 0.5 * x
    if kind == "near-constant":  # std far below the operand's resolution of the mean
        return 2.0 + 1e-3 * x
    if kind == "letterboxed":  # constant borders beside an image
        x[..., :, :4] = 0.0
        x[..., :, 12:] = 255.0
        return x
    assert kind == "outlier pivot", kind
    # One extreme pixel first in every patch (the statistics' pivot) in a flat patch: the
    # shifted sums' worst case.
    x = 3.0 + 0.01 * x
    x[..., ::4, ::4] = 3000.0
    return x


def randomise(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Perturb every parameter (LayerNorms start at 1 / 0, which would hide a wrong mapping)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def make(C: int, D: int, patch, flags=(True, True, True)) -> PatchEmbeddings:
    """An fp64 PatchEmbeddings with perturbed parameters; flags = (pre_norm, post_norm, bias)."""
    pre, post, bias = flags
    m = PatchEmbeddings(C, D, patch_size=patch, pre_norm=pre, post_norm=post, bias=bias)
    return randomise(m, 0.2).double()


def layer_norm(weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Norm:
    """A LayerNorm as the op's norm value."""
    return Norm(LAYER_NORM, weight, bias, eps)


def module_op_inputs(m: PatchEmbeddings, x: Tensor) -> FwdArgs:
    """The fused op's inputs for ``m(x)`` outside autocast (its LayerNorms or Identities)."""
    e = m.embedding

    def norm(layer: nn.Module):
        return (
            layer_norm(layer.weight, layer.bias, m.eps) if isinstance(layer, nn.LayerNorm) else None
        )

    proj = e[2]
    return op_inputs(x, m.patch_size, proj.weight, proj.bias, norm(e[1]), norm(e[3]))


def check(m: nn.Module, x: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Fused (on device) vs eager (same dtype, CPU) vs fp64 reference; returns the fused output."""
    ref = m.to(torch.float64)(x.double())
    m.to(device, dtype).backend = "eager"  # the eager module in dtype where the fused one runs
    with torch.no_grad():
        eager = m(x.to(device, dtype))
    m.backend = "triton"
    with torch.no_grad():
        fused = m(x.to(device, dtype))
    m.backend = "auto"
    m.to("cpu")
    assert fused.dtype == dtype and fused.device.type == device
    assert_accurate(fused, eager, ref, dtype, f"{tuple(x.shape)} {dtype}")
    return fused


def grads(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    """(y, dx, then every parameter gradient) for the upstream gradient dy."""
    x = x.detach().requires_grad_(x.requires_grad)
    m.zero_grad(set_to_none=True)
    y = m(x)
    y.backward(dy.to(y.dtype))
    out = [y, *([x.grad] if x.requires_grad else [])]
    return out + [p.grad for p in m.parameters()]


def compare(m, x, dtype, device, needs_x_grad=True) -> None:
    x = x.requires_grad_(needs_x_grad)
    dy = torch.randn(x.shape[0], *m(x.double()).shape[1:])
    ref = grads(m.double(), x.double(), dy.double())
    m.to(device, dtype).backend = "eager"  # the eager module in dtype where the fused one runs
    eager = grads(m, x.to(device, dtype), dy.to(device))
    m.backend = "triton"
    fused = grads(m, x.to(device, dtype), dy.to(device))
    names = ["y", *(["dx"] if needs_x_grad else []), *(n for n, _ in m.named_parameters())]
    assert len(fused) == len(ref)
    for name, f, e, r in zip(names, fused, eager, ref, strict=True):
        assert f is not None, f"no gradient for {name}"
        assert f.dtype == e.dtype, name
        assert_accurate(f, e, r, dtype, name)


def check_drop_in(model: nn.Module, x: torch.Tensor, device: str, calls: list, expect=1,
                  convert=fuse_patch_embeddings, expect_calls=None, **kw):  # fmt: skip
    """Same outputs, same gradients, same parameters and state-dict keys after conversion
    (``convert``: fuse_patch_embeddings, or fuse_stems for whole stems)."""
    model = randomise(model).eval()
    before = copy.deepcopy(model).to(device)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    params = {n: p for n, p in model.named_parameters()}
    summary = convert(model, backend="triton")
    assert len(summary.converted) == expect, str(summary)
    assert {n: p for n, p in model.named_parameters()} == params  # the very same Parameters
    model.load_state_dict({k: v.to(device) for k, v in saved.items()})  # old checkpoint loads
    x = x.to(device)
    out_ref, out = before(x, **kw), model(x, **kw)
    wanted = expect if expect_calls is None else expect_calls
    assert len(calls) == wanted, "the converted model did not run the fused op"
    out_ref = getattr(out_ref, "last_hidden_state", out_ref)
    out = getattr(out, "last_hidden_state", out)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), before.parameters(), strict=True):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)
    return model, summary


def same_outcome(model: nn.Module, before: nn.Module, x: torch.Tensor) -> None:
    """``model(x)`` gives what ``before(x)`` gives: the same output, or the same error."""
    outcomes = []
    for m in (model, before):
        try:
            with torch.no_grad():
                out = m(x)
            outcomes.append(("output", getattr(out, "last_hidden_state", out)))
        except Exception as exc:  # noqa: BLE001 - compared below
            outcomes.append(("error", f"{type(exc).__name__}: {exc}"))
    (kind, got), (kind_ref, want) = outcomes
    assert kind == kind_ref, outcomes
    if kind == "error":
        assert got == want
    else:
        torch.testing.assert_close(got, want)


def same_random_run(model: nn.Module, before: nn.Module, x: Tensor, calls: list, expect_calls=1,
                    parts=None, method: str = "forward", seed: int = 7,
                    **kw) -> list[Tensor]:  # fmt: skip
    """Training mode, the same seed: ``model`` (converted) gives what ``before`` gives from
    ``<method>(x, **kw)`` (the tensors ``parts(output)`` picks, default the output or its
    last_hidden_state; the image's and every parameter's gradient) and consumes the same random
    numbers (the next draws on the CPU and on the image's device agree). Returns the converted
    model's parts."""
    parts = parts or (lambda out: [getattr(out, "last_hidden_state", out)])
    runs = []
    for m in (before, model):
        m.train().zero_grad(set_to_none=True)
        image = x.detach().clone().requires_grad_()
        calls.clear()
        torch.manual_seed(seed)
        got = list(parts(getattr(m, method)(image, **kw)))
        runs.append((got, torch.rand(3), torch.rand(3, device=x.device)))
        sum(t.float().square().mean() for t in got if t.is_floating_point()).backward()
        runs[-1] += ([image.grad, *(p.grad for p in m.parameters())],)
    assert len(calls) == expect_calls, "the converted model did not take the fused path"
    (want, *want_rng, want_grads), (got, *got_rng, got_grads) = runs
    assert [t.dtype for t in got] == [t.dtype for t in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_rng, want_rng, strict=True):
        assert torch.equal(g, w), "the converted model consumed other random numbers"
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert (g is None) == (w is None), f"gradient {i}"
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"gradient {i}")
    return got


class OutputShapes(TorchDispatchMode):
    """While active, records the shape of every tensor each op returns (the fused op included:
    under a dispatch mode it goes through its custom op), but for expanded views (a zero
    stride: the peers' shape-only stand-ins), which hold no values of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and 0 not in t.stride():
                self.shapes.add(tuple(t.shape))
        return out


def no_full_length_tokens(model: nn.Module, x: Tensor, method: str, tokens: int, dim: int,
                          prefix: int, **kw) -> set:  # fmt: skip
    """Runs ``model.<method>(x, **kw)`` recording every op's output shapes; asserts that none is
    a full-length (B, N, D) or (B, P + N, D) token tensor. Returns the shapes seen."""
    with OutputShapes() as seen:
        getattr(model, method)(x, **kw)
    full = {(x.shape[0], tokens, dim), (x.shape[0], prefix + tokens, dim)}
    assert not full & seen.shapes, f"a full-length token tensor was built: {full & seen.shapes}"
    return seen.shapes


def assert_kernels_match_eager_math(args: FwdArgs) -> None:
    """The op's CPU implementation without the interpreter (reference.forward_with_stats and
    backward_from_stats) computes what the kernels do for ``args`` (fp64): outputs,
    statistics, every gradient."""
    from zeta_fused.op.args import BwdArgs, Grads
    from zeta_fused.op.reference import backward_from_stats, forward_with_stats

    y, stats = torch.ops.zeta_fused.patch_embed_fwd(*args)
    dy = torch.randn_like(y)
    grads = torch.ops.zeta_fused.patch_embed_bwd(*BwdArgs(dy, stats, True, *args))
    on_cpu = FwdArgs(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in args))
    ref_y, ref_stats = forward_with_stats(on_cpu)
    torch.testing.assert_close(y.cpu(), ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.cpu(), ref_stats, rtol=1e-10, atol=1e-10)
    ref = backward_from_stats(BwdArgs(dy.cpu(), ref_stats, True, *on_cpu))
    for field, got, want in zip(Grads._fields, grads, ref, strict=True):
        assert got.shape == want.shape, field
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9, msg=field)
