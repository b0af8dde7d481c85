"""The launch policy from the device: a pure function of (arch, SM count, shared memory per
block), its shared-memory fit, the device lookup and what the launchers pass to the kernels.
Stand-in device properties on the CPU; the compile matrix (test_aot_compile.py) checks the
estimates against what Triton reports for each architecture."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from zeta_fused.op import devices, policy
from zeta_fused.op.devices import KIB, TARGETS, for_device


def fields(pol: policy.LaunchPolicy) -> dict:
    return {f.name: getattr(pol, f.name) for f in dataclasses.fields(pol)}


def test_an_h100_gets_the_policy_tuned_for_it() -> None:
    """132 SMs and 227 KiB per block: the defaults, unchanged (today's sm_90 machine code)."""
    assert fields(for_device("sm_90", 132, 227 * KIB)) == fields(policy.DEFAULT)


def test_grid_targets_follow_the_sm_count() -> None:
    a100 = for_device("sm_80", 108, 163 * KIB)
    assert (a100.small_grid, a100.dw_target_programs) == (27, 216)
    assert a100.relayout_min_tokens == 27 * a100.blocks_16bit.m
    l4 = for_device("sm_89", 58, 99 * KIB)
    assert (l4.small_grid, l4.dw_target_programs) == (15, 116)
    assert for_device("gfx942", 304, 64 * KIB).dw_target_programs == 608


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_policy_fits_its_shared_memory(name: str) -> None:
    t = TARGETS[name]
    pol = devices.for_target(name)
    for field in ("blocks_16bit", "blocks_32bit"):
        estimates = devices.policy_estimates(pol, field, t.arch)
        assert max(estimates.values()) <= t.smem_per_block, (field, estimates)
        assert getattr(pol, field).stages == devices.default_stages(t.arch)
        assert getattr(pol, field).fwd_stages == devices.default_stages(t.arch)


def test_tiles_shrink_only_where_they_overflow() -> None:
    """The dW tile (256 x 64, fp32 dZ and patches under autocast, one pipeline copy fewer for
    its loaded row offsets) overflows MI300's LDS: its D rows halve there. The forward's paired
    128 x 128 tiles with fp32 patches (autocast) halve their tokens on the 99 KiB parts and
    MI300, and their columns too on the 99 KiB parts. The 163 and 227 KiB parts keep the H100
    tiles (B200's forward: see below)."""
    for name in ("sm_80", "sm_90"):
        assert devices.for_target(name).blocks_16bit == policy.DEFAULT.blocks_16bit, name
    # tcgen05 accumulates in tensor memory: single 256-column forward tiles, not pairs.
    want = dataclasses.replace(policy.DEFAULT.blocks_16bit, fwd_pair=False, fwd_n=256)
    assert devices.for_target("sm_100").blocks_16bit == want
    shrunk = {"sm_86": {"fwd_n": 64}, "sm_89": {"fwd_n": 64}, "sm_120": {"fwd_n": 64},
              "gfx942": {"dw_d": 128}}  # fmt: skip
    for name, more in shrunk.items():
        blocks = devices.for_target(name).blocks_16bit
        stages = devices.default_stages(name)
        want = dataclasses.replace(policy.DEFAULT.blocks_16bit, fwd_m=64, stages=stages,
                                   fwd_stages=stages, **more)  # fmt: skip
        assert blocks == want, name


def test_a_small_limit_shrinks_tiles_then_stages() -> None:
    pol = for_device("sm_89", 24, 48 * KIB)
    for field in ("blocks_16bit", "blocks_32bit"):
        assert max(devices.policy_estimates(pol, field, "sm_89").values()) <= 48 * KIB
    assert pol.blocks_16bit.fwd_n < policy.DEFAULT.blocks_16bit.fwd_n
    tiny = for_device("sm_89", 24, 10 * KIB)  # fp64's smallest tiles fit with fewer stages only
    assert max(devices.policy_estimates(tiny, "blocks_32bit", "sm_89").values()) <= 10 * KIB
    assert tiny.blocks_32bit.stages == tiny.blocks_32bit.fwd_stages == 2
    b = tiny.blocks_32bit
    assert {b.m, b.dw_d, b.dx_k, b.fwd_m, b.fwd_n, b.fwd_k} == {16}
    with pytest.raises(ValueError, match="fit"):
        for_device("sm_89", 24, 8 * KIB)


def test_the_policy_is_one_object_per_kind_of_device() -> None:
    """The launchers' caches key on the policy object: the same device, the same object."""
    assert for_device("sm_86", 84, 99 * KIB) is for_device("sm_86", 84, 99 * KIB)
    assert for_device("sm_86", 84, 99 * KIB) is not for_device("sm_86", 72, 99 * KIB)


def test_pipeline_buffers_per_architecture() -> None:
    """mma.sync (sm_80 to sm_89, sm_120) and AMD keep stages - 1 copies; wgmma and tcgen05
    stages; an architecture not measured is assumed to keep stages (the larger estimate)."""
    for arch in ("sm_80", "sm_86", "sm_89", "sm_120", "gfx942"):
        assert devices.pipeline_buffers(arch, 3) == 2, arch
        assert devices.pipeline_buffers(arch, 1) == 1, arch
    for arch in ("sm_90", "sm_100", "sm_130", "gfx950"):
        assert devices.pipeline_buffers(arch, 3) == 3, arch
    assert devices.default_stages("gfx942") == 2 and devices.default_stages("sm_120") == 3


def test_estimate_grows_with_stages_and_operand_width() -> None:
    blocks = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}  # the pipeline outweighs the epilogue
    kernel = "_patch_embed_fwd_kernel"

    def est(loaded: int, arch: str, stages: int) -> int:
        return devices.smem_estimate(kernel, blocks, {"X": loaded, "W": loaded}, 2, 4, arch,
                                     stages)  # fmt: skip

    assert est(2, "sm_90", 4) > est(2, "sm_90", 3) > est(2, "sm_90", 2)
    assert est(4, "sm_90", 3) > est(2, "sm_90", 3)
    assert est(2, "sm_90", 3) > est(2, "sm_89", 3)  # 3 buffers against 2


def props(**kw) -> SimpleNamespace:
    base = dict(name="Stand-in GPU", major=8, minor=6, multi_processor_count=84,
                shared_memory_per_block=48 * KIB, shared_memory_per_block_optin=99 * KIB,
                gcnArchName="")  # fmt: skip
    return SimpleNamespace(**(base | kw))


def test_limits_come_from_the_device_properties(monkeypatch) -> None:
    assert devices.limits_of(props()) == ("sm_86", 84, 99 * KIB)
    no_optin = props(shared_memory_per_block_optin=0)
    assert devices.limits_of(no_optin) == ("sm_86", 84, 48 * KIB)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    mi300 = props(gcnArchName="gfx942:sramecc+:xnack-", multi_processor_count=304,
                  shared_memory_per_block_optin=0, shared_memory_per_block=64 * KIB)  # fmt: skip
    assert devices.limits_of(mi300) == ("gfx942", 304, 64 * KIB)


class OnGpu:
    """What the launchers read of a CUDA tensor."""

    is_cuda = True

    def __init__(self, index: int) -> None:
        self.index = index

    def get_device(self) -> int:
        return self.index


def test_launchers_read_each_devices_policy_once(monkeypatch) -> None:
    seen = []

    def get_props(index):
        seen.append(index)
        return props(multi_processor_count=84 if index == 0 else 170, major=8 + 4 * index,
                     minor=6 if index == 0 else 0)  # fmt: skip

    monkeypatch.setattr(torch.cuda, "get_device_properties", get_props)
    monkeypatch.setattr(policy, "_by_device", {})
    first, second = policy.for_tensor(OnGpu(0)), policy.for_tensor(OnGpu(1))
    assert first is for_device("sm_86", 84, 99 * KIB)
    assert second is for_device("sm_120", 170, 99 * KIB)
    assert policy.for_tensor(OnGpu(0)) is first and seen == [0, 1]
    assert policy.for_tensor(torch.zeros(1)) is policy.DEFAULT  # the CPU interpreter
    with policy.override(small_grid=5):
        tuned = policy.for_tensor(OnGpu(1))
        assert tuned.small_grid == 5 and tuned.dw_target_programs == 340
        assert policy.for_tensor(OnGpu(1)) is tuned
        assert policy.current().small_grid == 5
    assert policy.for_tensor(OnGpu(1)) is second


launch = pytest.importorskip("zeta_fused.op.launch", reason="needs Triton")


class Recorder:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


def test_launchers_pass_the_policys_tiles_and_stages(monkeypatch, device) -> None:
    """Under MI300's policy the GEMM kernels get 2 stages and the narrower dW tile. (The small
    parameter-gradient kernel really runs: on the GPU where there is one.)"""
    calls: list[dict] = []
    for name in ("_patch_embed_fwd_kernel", "_bwd_dz_kernel", "_bwd_dw_kernel", "_bwd_dx_kernel"):
        monkeypatch.setattr(launch, name, Recorder(calls))
    from zeta_fused.functional import op_inputs
    from zeta_fused.op.args import BwdArgs

    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16, device=device)
    w = torch.randn(512, 48, dtype=torch.bfloat16, device=device)
    args = op_inputs(x, (4, 4), w, None, None, None)
    with policy.override(base=devices.for_target("gfx942")):
        y = x.new_empty(2, 256, 512)
        launch.patch_embed_fwd(args)
        launch.patch_embed_bwd(BwdArgs(y, torch.zeros(6, 512, device=device), True, *args))
    assert [c["num_stages"] for c in calls] == [2, 2, 2, 2]
    assert calls[2]["BLOCK_D"] == 128 and calls[0]["BLOCK_M"] == 64
