"""The README's examples, run as written, in order, in one namespace (its "Getting started"
code blocks; the pretrained weights are not downloaded): the shapes they assert hold, and the
summary of ``fuse_stems`` is the one the README prints."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from support import ROOT

README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_examples_run_as_written() -> None:
    pytest.importorskip("timm", reason="a test extra")
    blocks = python_blocks()
    assert len(blocks) == 3  # the three ways to use it
    scope: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            code = block.replace("pretrained=True", "pretrained=False")  # no download
            exec(code, scope)  # noqa: S102 - the README's own code
    # The summary the first example prints is the one its comment shows.
    shown = [line[2:] for line in blocks[0].splitlines() if line.startswith("# ")]
    assert printed.getvalue().splitlines() == shown
