"""The launch decisions that the compiled code trusts: contiguity flags and alignment hints.

A wrong "flat" flag reads the wrong elements, and a wrong alignment hint makes the GPU issue
misaligned vector loads; the interpreter ignores hints, so these are checked here directly.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

launch = pytest.importorskip("zeta_fused.launch", reason="needs Triton")


def offsets(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Every token's first-pixel offset, from the strides."""
    b, _, h, w = x.shape
    sb, _, sh, sw = x.stride()
    bi, ti, tj = torch.meshgrid(
        torch.arange(b), torch.arange(h // ph), torch.arange(w // pw), indexing="ij"
    )
    return (bi * sb + ti * ph * sh + tj * pw * sw).flatten()


@pytest.mark.parametrize(
    "make, ph, pw",
    [
        (lambda: torch.empty(2, 3, 224, 224), 16, 16),
        (lambda: torch.empty(2, 3, 224, 224), 14, 14),
        (lambda: torch.empty(2, 3, 32, 48).to(memory_format=torch.channels_last), 4, 4),
        (lambda: torch.empty(2, 3, 30, 45)[..., 3:], 3, 7),
        (lambda: torch.empty(1, 3, 16, 16).expand(4, 3, 16, 16), 8, 8),
    ],
    ids=["nchw-p16", "nchw-p14", "channels-last", "sliced", "expanded"],
)
def test_row_align_divides_every_token_offset(make, ph, pw) -> None:
    x = make()
    align = launch._row_align(x, ph, pw)
    assert align & (align - 1) == 0 and 1 <= align <= launch.MAX_ROW_ALIGN
    assert bool((offsets(x, ph, pw) % align == 0).all())


def test_row_align_is_not_needlessly_small() -> None:
    assert launch._row_align(torch.empty(2, 3, 224, 224), 16, 16) == 16


@pytest.mark.parametrize("cij", [False, True], ids=["ijc", "cij"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.empty(20, 24),  # Linear, (i, j, c) order
        lambda: torch.empty(24, 20).t(),  # transposed Linear
        lambda: torch.empty(20, 3, 4, 2),  # Conv2d, (c, i, j) order
        lambda: torch.empty(20, 3, 4, 2).to(memory_format=torch.channels_last),
    ],
    ids=["linear", "linear-t", "conv", "conv-channels-last"],
)
def test_flat_means_offset_equals_index(make, cij) -> None:
    """_flat_in is True exactly when the element offsets of the patch axis, walked in the
    kernel's K order, are 0, 1, 2, ..."""
    w, chans, ph, pw = make(), 3, 4, 2
    strides = launch._weight_strides(w, chans, pw)
    _, sc, si, sj = strides
    c, i, j = torch.meshgrid(
        torch.arange(chans), torch.arange(ph), torch.arange(pw), indexing="ij"
    )  # (c, i, j) order
    walk = (
        (c * sc + i * si + j * sj).flatten()
        if cij
        else (c * sc + i * si + j * sj).permute(1, 2, 0).flatten()
    )
    expected = bool(torch.equal(walk, torch.arange(chans * ph * pw)))
    assert launch._flat_in(strides, chans, ph, pw, cij) == expected


def test_k_order_policy() -> None:
    """(c, i, j) where the image has contiguous rows and either nothing needs re-laying (a
    Conv2d weight, no pre-norm) or the call is large; re-laid operands are exact copies."""
    small, large = torch.randn(2, 3, 8, 8), torch.randn(40, 3, 32, 32)  # 8 and 2560 tokens
    nhwc = large.to(memory_format=torch.channels_last)
    linear, conv = torch.randn(16, 48), torch.randn(16, 3, 4, 4)
    g1, b1 = torch.randn(48), torch.randn(48)
    assert large.shape[0] * 64 >= launch.RELAYOUT_MIN_TOKENS > 8

    k = launch._k_order(small, conv, None, None, 4, 4)
    assert (k.cij, k.w_flat) == (True, True) and k.weight is conv
    k = launch._k_order(small, conv, g1, b1, 4, 4)
    assert (k.cij, k.w_flat) == (False, False) and k.g1 is g1
    k = launch._k_order(small, linear, g1, b1, 4, 4)
    assert (k.cij, k.w_flat) == (False, True) and k.weight is linear
    k = launch._k_order(nhwc, linear, g1, b1, 4, 4)
    assert (k.cij, k.w_flat) == (False, True)
    k = launch._k_order(large, linear, g1, b1, 4, 4)
    assert (k.cij, k.w_flat) == (True, True)
    # (c, i, j) element e of the re-laid operands is element (i, j, c) of the originals.
    c, i, j = 2, 1, 3
    e, orig = (c * 4 + i) * 4 + j, (i * 4 + j) * 3 + c
    assert torch.equal(k.weight.reshape(16, 48)[:, e], linear[:, orig])
    assert k.g1[e] == g1[orig] and k.b1[e] == b1[orig]


def test_large_calls_realign_weight_rows() -> None:
    """A weight whose rows are not 16-element aligned (here K = 18; vit_l14 has 588) is copied
    into padded rows for large calls; patch width 3 keeps the (i, j, c) order."""
    x, w = torch.randn(400, 3, 8, 9), torch.randn(10, 18)  # 400 * 12 tokens, patch (2, 3)
    k = launch._k_order(x, w, None, None, 2, 3)
    assert not k.cij and k.w_flat and k.weight.stride() == (32, 1) and k.kw == 32
    assert torch.equal(k.weight, w)
    padded = k.weight.as_strided((10, 32), (32, 1))  # the kernels read W rows up to kw
    assert torch.equal(padded[:, 18:], torch.zeros(10, 14))
    small = launch._k_order(x[:2], w, None, None, 2, 3)
    assert small.weight is w and not small.cij


def test_token_strides_flat_only_when_rows_are_evenly_spaced() -> None:
    assert launch._token_strides(torch.empty(2, 6, 16))[3]
    assert launch._token_strides(torch.empty(()).expand(2, 6, 16))[3]  # y.sum().backward()
    assert launch._token_strides(torch.empty(1, 6, 16).expand(2, 6, 16))[3] is False
    assert launch._token_strides(torch.empty(6, 2, 16).transpose(0, 1))[3] is False


TF32_SETTINGS = """
import os, torch
from zeta_fused import PatchEmbeddings, launch

matmul = torch.backends.cuda.matmul
new_api = hasattr(torch.backends, "fp32_precision")
steps = [
    ("default", None, "ieee"),
    ("set_float32_matmul_precision high",
     lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    ("set_float32_matmul_precision highest",
     lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
    ("allow_tf32 = True", lambda: setattr(matmul, "allow_tf32", True), "tf32"),
]
if new_api:  # after these, reading the legacy allow_tf32 raises
    steps += [
        ("fp32_precision = ieee", lambda: setattr(matmul, "fp32_precision", "ieee"), "ieee"),
        ("fp32_precision = tf32", lambda: setattr(matmul, "fp32_precision", "tf32"), "tf32"),
    ]
for name, apply, want in steps:
    if apply:
        apply()
    got = launch._numerics(torch.float32)["DOT_PRECISION"]
    assert got == want, (name, got, want)
    assert launch._numerics(torch.bfloat16)["DOT_PRECISION"] == "ieee", name
device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
m = PatchEmbeddings(3, 8, patch_size=4, backend="triton", device=device)
y = m(torch.randn(1, 3, 8, 8, device=device))
y.sum().backward()
assert torch.isfinite(y).all()
print("ok", len(steps))
"""


def test_fp32_precision_follows_every_torch_setter() -> None:
    """TF32 for fp32 GEMMs exactly when torch's matmul precision allows it, through the legacy
    and the new (torch >= 2.9) setters; a program that used the new one still runs (torch
    raises on reading the legacy flag then). A fresh process: these settings are global."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run(
        [sys.executable, "-c", TF32_SETTINGS], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


def test_launchers_switch_to_their_tensors_gpu(monkeypatch) -> None:
    """Triton launches on the current device: a call whose tensors are on another GPU runs
    under that GPU's device guard (logic checked with stand-ins; the 2-GPU run is a gpu test)."""
    entered = []

    class Guard:
        def __init__(self, device) -> None:
            entered.append(device)

        def __enter__(self) -> None:
            pass

        def __exit__(self, *exc) -> None:
            pass

    class OnGpu:
        is_cuda = True

        def __init__(self, index: int) -> None:
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    calls = []

    class Args(NamedTuple):
        x: object
        n: int

    wrapped = launch.on_tensor_device(lambda args: calls.append(args.n) or "ran")
    assert wrapped(Args(OnGpu(1), 2)) == "ran" and entered == [torch.device("cuda", 1)]
    assert wrapped(Args(OnGpu(0), 4)) == "ran" and len(entered) == 1
    assert wrapped(Args(torch.zeros(1), 5)) == "ran" and len(entered) == 1
    assert calls == [2, 4, 5]
    for launcher in (launch.patch_embed_fwd, launch.patch_embed_bwd):
        assert launcher.__wrapped__.__code__.co_filename == launch.__file__
