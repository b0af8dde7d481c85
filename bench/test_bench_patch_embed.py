"""pytest-benchmark files for regression tracking (GPU only):

    pytest bench --benchmark-only --benchmark-autosave
    pytest bench --benchmark-only --benchmark-compare

Wall-clock per call with a device synchronise inside the timed target; the kernel-only
do_bench median goes into ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from .measure import time_ms
from .presets import PRESETS
from .providers import PROVIDERS

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="benchmarks time CUDA kernels; no CUDA device here"
)

CASES = [
    ("vit_b16", "fwd"),
    ("vit_b16", "train"),
    ("seed_doc_example", "fwd"),
    ("b1_latency_b16", "fwd"),
]
NAMES = ["zeta-fused", "eager", "compile", "timm-conv"]


@pytest.mark.parametrize("provider", NAMES)
@pytest.mark.parametrize(("preset", "mode"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_patch_embed(benchmark, preset, mode, provider) -> None:
    p = PRESETS[preset]
    benchmark.group = f"{preset}-{mode}"
    benchmark.extra_info.update(p.as_dict(), mode=mode, gpu=torch.cuda.get_device_name())
    _, step = PROVIDERS[provider].build(p, "cuda", mode)
    step()  # compile / autotune outside the timing

    def target():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info["do_bench_ms"] = time_ms(step, "cuda")[0]
    benchmark.pedantic(target, rounds=50, warmup_rounds=5)
