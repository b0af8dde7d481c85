"""Opt-in tuning: off by default, the fastest of the fitting candidates and the eager path per
kind of call, its disk cache, and the places it never times. On the CPU the kernels run
through the interpreter and the timer is a stand-in that reports chosen times per candidate
(the real timer is CUDA events: the GPU run fills the table)."""

from __future__ import annotations

import json
import threading
import warnings

import pytest
import torch

import zeta_fused
from zeta_fused import patch_embed

tuning = pytest.importorskip("zeta_fused.op.tuning")
launch = pytest.importorskip("zeta_fused.op.launch", reason="needs Triton")


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Tuning on, a fresh table and cache folder, and a stand-in timer: each candidate's label
    -> milliseconds (default 1.0); every timed label is recorded."""
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_loaded", set())
    monkeypatch.setattr(tuning, "_enabled", True)
    times: dict[str, float] = {}
    timed: list[str] = []

    def stand_in(label, fn, cuda):
        fn()  # the candidate runs (a failing one fails the test)
        timed.append(label)
        return times.get(label, 1.0)

    monkeypatch.setattr(tuning, "_time_ms", stand_in)
    return times, timed


D = 64  # one BLOCK_N of the fp32 table: "n/2" launches other tiles than the device policy


def inputs(device: str, requires_grad: bool = False):
    """On ``device`` (the conftest fixture: the GPU where there is one, where the fused
    backend refuses CPU tensors; else the CPU interpreter)."""
    x = torch.randn(2, 3, 32, 32, device=device, requires_grad=requires_grad)
    w = torch.randn(D, 48, device=device, requires_grad=requires_grad)
    b = torch.randn(D, device=device, requires_grad=requires_grad)
    norm = (
        torch.ones(D, device=device, requires_grad=requires_grad),
        torch.zeros(D, device=device),
    )
    return x, w, b, norm


def call(x, w, b, norm, backend="triton"):
    return patch_embed(x, 4, w, b, post_norm=norm, backend=backend)


class KernelSpy:
    """Wraps a kernel: records the constexprs of each launch, then launches it."""

    def __init__(self, kernel, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return run


@pytest.mark.parametrize(("value", "on"), [(None, False), ("", False), ("1", True),
    ("true", True), ("Yes", True), ("on", True), ("0", False), ("false", False), ("no", False),
    (" OFF ", False)])  # fmt: skip
def test_off_by_default_and_the_environment_variable(monkeypatch, value, on) -> None:
    monkeypatch.setattr(tuning, "_enabled", None)
    if value is None:
        monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(tuning.ENV_VAR, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the usual spellings need no warning
        assert zeta_fused.tuning() is on
    assert zeta_fused.tuning(False) is False and zeta_fused.tuning() is False


def test_an_unknown_environment_value_warns_and_leaves_tuning_off(monkeypatch) -> None:
    monkeypatch.setattr(tuning, "_enabled", None)
    monkeypatch.setenv(tuning.ENV_VAR, "maybe")
    with pytest.warns(UserWarning, match=r"ZETA_FUSED_TUNING='maybe' is not one of \('1', 'true'"):
        assert zeta_fused.tuning() is False


def test_untuned_calls_never_time(monkeypatch, device) -> None:
    monkeypatch.setattr(tuning, "_enabled", False)
    monkeypatch.setattr(tuning, "_time_ms", lambda *a: pytest.fail("timed with tuning off"))
    call(*inputs(device))


def test_the_fastest_candidate_is_kept_and_launched(tuned, monkeypatch, device) -> None:
    times, timed = tuned
    times.update({"fwd n/2": 0.5, f"path:inference {tuning.EAGER}": 9.0})
    x, w, b, norm = inputs(device)
    want = call(x, w, b, norm, backend="eager")
    with torch.no_grad():
        got = call(x, w, b, norm)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    fwd = [t for t in timed if t.startswith("fwd ")]
    assert "fwd device" in fwd and "fwd n/2" in fwd and len(fwd) >= 4
    assert f"path:inference {tuning.EAGER}" in timed
    assert not any(t.startswith("bwd") for t in timed)  # inference: the forward only

    launches: list[dict] = []
    monkeypatch.setattr(launch, "_patch_embed_fwd_kernel",
                        KernelSpy(launch._patch_embed_fwd_kernel, launches))  # fmt: skip
    timed.clear()
    with torch.no_grad():
        again = call(x, w, b, norm)
    assert timed == []  # tuned once per kind of call
    device_n = tuning.policy.for_tensor(x).blocks_32bit.fwd_n  # fp32 GEMMs: the 32-bit table
    assert device_n == D and launches[0]["BLOCK_N"] == D // 2
    torch.testing.assert_close(again, got)


def test_the_eager_path_wins_when_it_is_faster(tuned, fused_calls, monkeypatch, device) -> None:
    """A tuned call is never slower than eager: eager measured fastest, eager runs (the same
    result as backend="eager", no kernel launch)."""
    times, _ = tuned
    times[f"path:inference {tuning.EAGER}"] = 0.1
    x, w, b, norm = inputs(device)
    want = call(x, w, b, norm, backend="eager")
    with torch.no_grad():
        call(x, w, b, norm)  # tunes
    monkeypatch.setattr(launch, "patch_embed_fwd", lambda *a: pytest.fail("fused launch"))
    with torch.no_grad():
        got = call(x, w, b, norm)
    assert torch.equal(got, want)


def test_training_times_forward_backward_and_eager(tuned, device) -> None:
    times, timed = tuned
    times.update({"bwd dw_d/2": 0.3, "path:training eager": 50.0})
    x, w, b, norm = inputs(device)
    w.requires_grad_(True)
    y = call(x, w, b, norm)
    (grad,) = torch.autograd.grad(y.square().sum(), w)
    ref_w = w.detach().requires_grad_(True)
    (want,) = torch.autograd.grad(call(x, ref_w, b, norm, "eager").square().sum(), ref_w)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4)
    assert any(t.startswith("fwd ") for t in timed)
    assert "bwd dw_d/2" in timed and "path:training eager" in timed
    name = tuning.device_name(x)
    assert any(k[:2] == (name, "bwd") and v == "dw_d/2" for k, v in tuning._choices.items())
    x.requires_grad_(True)  # the image gradient: other kernels, tuned again
    timed.clear()
    call(x, w, b, norm).sum().backward()
    assert any(t.startswith("bwd+x ") for t in timed) and "path:training+x eager" in timed


def test_candidates_that_fail_are_skipped(tuned, monkeypatch, device) -> None:
    """A candidate that cannot run (an OutOfResources the estimate missed) is not chosen; with
    no fused candidate left the call runs eager, and works."""
    times, timed = tuned
    times["fwd n/2"] = 0.1
    real = tuning._time_ms

    def failing(label, fn, cuda):
        if label in ("fwd n/2", "fwd k*2"):
            raise RuntimeError("out of resources: shared memory")
        return real(label, fn, cuda)

    monkeypatch.setattr(tuning, "_time_ms", failing)
    x, w, b, norm = inputs(device)
    with torch.no_grad():
        call(x, w, b, norm)
    name, key = tuning.device_name(x), tuning.call_key(tuning_args(x, w, b, norm))
    assert tuning._choices[(name, "fwd", key)] not in ("n/2", "k*2")
    doc = json.loads(tuning.cache_file(tuning.identity(name)).read_text())
    assert set(doc["choices"][f"fwd {key}"]["failed"]) == {"n/2", "k*2"}

    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_loaded", set())
    monkeypatch.setenv(tuning.CACHE_ENV, str(tuning.cache_dir() / "other"))

    def all_fail(label, fn, cuda):
        if not label.endswith(tuning.EAGER):
            raise RuntimeError("no kernel runs here")
        return real(label, fn, cuda)

    monkeypatch.setattr(tuning, "_time_ms", all_fail)
    w.requires_grad_(True)
    y = call(x, w, b, norm)
    assert tuning._choices[(name, "path:training", key)] == tuning.EAGER
    (grad,) = torch.autograd.grad(y.sum(), w)
    ref_w = w.detach().requires_grad_(True)
    (want,) = torch.autograd.grad(call(x, ref_w, b, norm, "eager").sum(), ref_w)
    torch.testing.assert_close(grad, want)


def test_choices_persist_per_gpu_driver_torch_and_triton(
    tuned, monkeypatch, tmp_path, device
) -> None:
    times, timed = tuned
    times["fwd k*2"] = 0.2
    x, w, b, norm = inputs(device)
    with torch.no_grad():
        call(x, w, b, norm)
    ident = tuning.identity(tuning.device_name(x))
    assert set(ident) == {"gpu", "driver", "torch", "triton", "zeta_fused"}
    files = list(tmp_path.glob("tuning-*.json"))
    assert files == [tuning.cache_file(ident)]
    doc = json.loads(files[0].read_text())
    assert doc["identity"] == ident
    entry = doc["choices"][f"fwd {tuning.call_key(tuning_args(x, w, b, norm))}"]
    assert entry["choice"] == "k*2" and entry["ms"]["k*2"] == 0.2

    # A new process (empty table) reads the file and times nothing.
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_loaded", set())
    timed.clear()
    with torch.no_grad():
        call(x, w, b, norm)
    assert timed == []

    # Another driver (or GPU, torch, Triton): another file, tuned again.
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_loaded", set())
    monkeypatch.setattr(tuning, "driver_version", lambda: "999.1")
    real_identity = tuning.identity
    monkeypatch.setattr(tuning, "identity", lambda n: real_identity(n) | {"driver": "999.1"})
    with torch.no_grad():
        call(x, w, b, norm)
    assert timed and len(list(tmp_path.glob("tuning-*.json"))) == 2


def tuning_args(x, w, b, norm):
    from zeta_fused.checks import norm_arg
    from zeta_fused.functional import op_inputs

    return op_inputs(x, (4, 4), w, b, None, norm_arg(norm, 1e-5, "post_norm"))


def unknown_choices(ident: dict, key: str) -> dict:
    """A file of this identity (another build with the same version string) whose choices for
    the call ``key`` name a candidate this build does not have."""
    choices = {f"fwd {key}": {"choice": "m*8"}, f"path:inference {key}": {"choice": "fused"}}
    return {"format": tuning.FILE_FORMAT, "identity": ident, "choices": choices}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "null", "choices as a list",
                                     "unknown choices"])  # fmt: skip
def test_an_unusable_cache_file_is_ignored(tuned, device, content) -> None:
    """Every call of the kind runs and is tuned again, and the file is rewritten."""
    _, timed = tuned
    x, w, b, norm = inputs(device)
    ident = tuning.identity(tuning.device_name(x))
    path, key = tuning.cache_file(ident), tuning.call_key(tuning_args(x, w, b, norm))
    if content == "choices as a list":
        content = json.dumps({"format": tuning.FILE_FORMAT, "identity": ident, "choices": []})
    elif content == "unknown choices":
        content = json.dumps(unknown_choices(ident, key))
    path.write_text(content)
    with torch.no_grad():
        torch.testing.assert_close(call(x, w, b, norm), call(x, w, b, norm, "eager"))
    assert "fwd device" in timed  # tuned
    doc = json.loads(path.read_text())  # and rewritten
    assert doc["format"] == tuning.FILE_FORMAT and doc["choices"][f"fwd {key}"]["choice"] in (
        tuning.FWD_CANDIDATES
    )


def test_never_times_while_compiling_capturing_or_on_fake_tensors(
    tuned, monkeypatch, device
) -> None:
    _, timed = tuned
    x, w, b, norm = inputs(device)
    a = tuning_args(x, w, b, norm)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuning.path_for(a) == "fused" and not tuning.may_time(x)
    monkeypatch.undo()
    monkeypatch.setattr(tuning, "_capturing", lambda t: True)  # CUDA-graph capture
    assert tuning.path_for(a) == "fused" and not tuning.may_time(x)
    monkeypatch.setattr(tuning, "_capturing", lambda t: False)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not tuning.may_time(fake)
    assert timed == []


def test_compiled_calls_use_the_choices_and_never_time(tuned, monkeypatch, device) -> None:
    times, timed = tuned
    times["fwd n/2"] = 0.1
    x, w, b, norm = inputs(device)
    with torch.no_grad():
        call(x, w, b, norm)  # tuned eagerly
    launches: list[dict] = []
    monkeypatch.setattr(launch, "_patch_embed_fwd_kernel",
                        KernelSpy(launch._patch_embed_fwd_kernel, launches))  # fmt: skip
    timed.clear()
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True)
    x2 = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        compiled(x2, w, b, norm)
    assert timed == [] and launches
    assert launches[0]["BLOCK_N"] == D // 2


def test_concurrent_first_calls_tune_once(tuned, monkeypatch, device) -> None:
    """Threads making the first call of a kind at once: one tunes, the others wait for its
    choice. (The interpreter itself is not thread-safe: its launches are serialised here.)"""
    _, timed = tuned
    interpreter, real = threading.Lock(), launch.patch_embed_fwd

    def serialised(*args, **options):
        with interpreter:
            return real(*args, **options)

    monkeypatch.setattr(launch, "patch_embed_fwd", serialised)
    x, w, b, norm = inputs(device)
    want = call(x, w, b, norm, backend="eager")
    results, errors = [], []

    def worker():
        try:
            with torch.no_grad():
                results.append(call(x, w, b, norm))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(timed) == len(set(timed))  # every candidate timed once
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_candidates_that_do_not_fit_are_not_timed(monkeypatch) -> None:
    """On a GPU the candidates are filtered by the device's shared memory."""
    from zeta_fused.op import devices

    pol = devices.for_target("gfx942")

    class OnGpu:
        is_cuda = True
        device = 0

    monkeypatch.setattr(devices, "limits_of", lambda props: ("gfx942", 304, 64 * 1024))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: None)
    names = tuning.candidates(pol, 2, "fwd", OnGpu())
    assert tuning.DEVICE in names
    for name in names:
        cand = tuning.candidate_policy(pol, 2, name, "fwd")
        assert max(devices.policy_estimates(cand, "blocks_16bit", "gfx942").values()) <= 65536
    assert "stages+1" not in names  # 3 stages of fp32 weight tiles overflow 64 KiB
    assert "n/2" in names


@pytest.mark.gpu
def test_no_timing_during_cuda_graph_capture(tuned) -> None:
    """A kind of call met first inside CUDA-graph capture runs fused, untimed (compiled
    beforehand with tuning off: Triton cannot load a module during capture)."""
    _, timed = tuned
    x, w, b, norm = inputs("cuda")
    tuning.tuning(False)
    with torch.no_grad():
        want = call(x, w, b, norm)
    tuning.tuning(True)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = call(x, w, b, norm)
    graph.replay()
    torch.cuda.synchronize()
    assert timed == []
    torch.testing.assert_close(out, want)
