"""bench.host_profile: its report (host time, Python profile, operator table) for a forward and
a training step; on the CPU a smoke run through the interpreter with a tiny preset."""

from __future__ import annotations

import torch

from bench import host_profile
from bench.presets import Preset


def test_the_report_names_both_cases_and_their_profiles(tmp_path, monkeypatch,
                                                        fused_path_calls) -> None:  # fmt: skip
    monkeypatch.setitem(host_profile.CHOICES, "tiny", Preset("tiny", 2, 3, 16, 16, (8, 8), 32,
                                                             "fp32"))  # fmt: skip
    args = ["--preset", "tiny", "--calls", "1", "--train-batch", "1", "--rows", "5"]
    assert host_profile.main([*args, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "host_profile.txt").read_text()
    for case in ("tiny forward, batch 2", "tiny training step, batch 1"):
        assert f"=== {case}: " in text
    assert text.count("us of host time per call") == 2
    assert text.count("--- sorted by tottime") == 2 and text.count("--- sorted by cumulative") == 2
    assert "patch_embed" in text  # the fused op's frames and operators are in the profiles
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"({device})" in text
    assert fused_path_calls  # the module ran fused, not its eager fallback
