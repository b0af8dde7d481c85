"""Every row of the error table, on every backend that can run here."""

from __future__ import annotations

import pytest
import torch

from zeta_fused import Norm, PatchEmbeddings, patch_embed
from zeta_fused.kernels.contract import LAYER_NORM, RMS_NORM

BACKENDS = ["eager", "triton"]  # "triton" runs under the interpreter on CPU


@pytest.fixture(params=BACKENDS)
def module(request, device) -> PatchEmbeddings:
    if request.param == "eager":
        device = "cpu"
    return PatchEmbeddings(3, 8, 16, backend=request.param, device=device)


def dev(module: PatchEmbeddings) -> torch.device:
    return module.embedding[2].weight.device


def test_wrong_ndim(module) -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(3, 16, 16\)"):
        module(torch.randn(3, 16, 16, device=dev(module)))


def test_wrong_channels(module) -> None:
    with pytest.raises(ValueError, match="3 input channels.*C=4"):
        module(torch.randn(1, 4, 16, 16, device=dev(module)))


def test_not_multiple_of_patch(module) -> None:
    with pytest.raises(ValueError, match="H=18, W=16.*4x4"):
        module(torch.randn(1, 3, 18, 16, device=dev(module)))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.complex64])
def test_non_float_dtype(module, dtype) -> None:
    x = torch.zeros(1, 3, 16, 16, device=dev(module)).to(dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        module(x)


def test_device_mismatch() -> None:
    m = PatchEmbeddings(3, 8, 16, device="meta")
    with pytest.raises(RuntimeError, match="cpu.*meta"):
        m(torch.randn(1, 3, 16, 16))


def test_dtype_mismatch_outside_autocast() -> None:
    m = PatchEmbeddings(3, 8, 16)
    with pytest.raises(RuntimeError, match="bfloat16.*float32"):
        m(torch.randn(1, 3, 16, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    ("seq_len", "patch_size", "match"),
    [
        (15, None, "seq_len=15 is not a perfect square"),
        (16, 8, r"seq_len=16 is inconsistent with patch_size=\(8, 8\)"),
        (None, None, "give seq_len"),
        (0, None, "seq_len=0"),
        (None, (0, 4), "positive"),
    ],
)
def test_construction_errors(seq_len, patch_size, match) -> None:
    with pytest.raises(ValueError, match=match):
        PatchEmbeddings(3, 8, seq_len, patch_size=patch_size)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        PatchEmbeddings(3, 8, 16, backend="cuda")


def test_empty_batch_launches_nothing(module, monkeypatch) -> None:
    import zeta_fused.op.launch as launch

    def boom(*args, **kwargs):
        raise AssertionError("kernel launched for an empty batch")

    monkeypatch.setattr(launch, "_patch_embed_fwd_kernel", boom)
    y = module(torch.randn(0, 3, 32, 16, device=dev(module)))
    assert y.shape == (0, 32, 8)


def test_functional_weight_shape() -> None:
    with pytest.raises(ValueError, match=r"\(D, 48\).*\(8, 12\)"):
        patch_embed(torch.randn(1, 3, 16, 16), 4, torch.randn(8, 12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["pre_norm", "post_norm", "stem_norm"])
@pytest.mark.parametrize("kind", [LAYER_NORM, RMS_NORM])
def test_negative_eps_is_rejected(backend, which, kind, device) -> None:
    """A negative epsilon gives NaN or skewed tokens: each norm's raises, the vectors and
    everything else being fine (the common path checks it, not only the slow one)."""
    on = "cpu" if backend == "eager" else device
    x, w = torch.randn(2, 3, 8, 8, device=on), torch.randn(8, 48, device=on)
    size = 48 if which == "pre_norm" else 8
    norm = Norm(kind, torch.ones(size, device=on), None, -1e-3)
    with pytest.raises(ValueError, match=f"{which} eps must be a non-negative number, got -0.001"):
        patch_embed(x, 4, w, **{which: norm}, backend=backend)
    if which != "stem_norm":  # a LayerNorm's pair takes the call's eps
        with pytest.raises(ValueError, match=f"{which} eps"):
            patch_embed(x, 4, w, **{which: (None, None)}, eps=-1e-3, backend=backend)


def test_layer_norm_has_no_default_eps() -> None:
    norm = Norm(LAYER_NORM, None, None, None)
    with pytest.raises(ValueError, match="pre_norm eps must be a non-negative number, got None"):
        patch_embed(torch.randn(1, 3, 8, 8), 4, torch.randn(8, 48), pre_norm=norm)


def test_errors_leave_nothing_half_done() -> None:
    """A rejected call changes no parameter and leaves no gradient behind."""
    m = PatchEmbeddings(3, 8, 16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 18, 16, requires_grad=True))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_too_many_tokens_for_the_fused_kernels(device) -> None:
    """The kernels index tokens in 32 bits: a larger batch raises before anything is allocated
    (an expanded image costs no memory here)."""
    m = PatchEmbeddings(3, 8, 16, backend="triton", device=device)
    x = torch.zeros(1, 3, 16, 16, device=device).expand(2**25, 3, 16, 16)  # 2**29 tokens
    with torch.no_grad(), pytest.raises(ValueError, match=r"536870912 tokens .*split the batch"):
        m(x)
