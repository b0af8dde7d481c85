"""Packaging: the repository's top-level ``kernels/`` folder ships as ``zeta_fused.kernels`` and
never shadows the unrelated ``kernels`` distribution (which transformers imports), whatever the
working directory; the wheel holds every module of the package and nothing at the top level
but ``zeta_fused``."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import ROOT

# What `import kernels` must give: the distribution's module, or, when it is absent, an empty
# module with no file and no version (find_spec found the folder, so the import must not fail).
_WHICH_KERNELS = """
import importlib.util, os, sys
import kernels
assert importlib.util.find_spec("kernels") is not None
if getattr(kernels, "__file__", None) is None:
    assert not hasattr(kernels, "__version__") and not hasattr(kernels, "get_kernel"), dir(kernels)
    print("absent")
else:
    print(os.path.realpath(kernels.__file__))
import zeta_fused.kernels.patch_embed_fwd
"""


def _site_without_kernels(tmp_path: Path) -> Path:
    """A site folder linking every installed package but the ``kernels`` distribution (its
    package and metadata): an environment where it was never installed."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    for folder in (*site.getsitepackages(), site.getusersitepackages()):
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            hidden = entry == "kernels" or re.fullmatch(r"kernels-[^-]+\.dist-info", entry)
            if not hidden and not (site_dir / entry).exists():
                (site_dir / entry).symlink_to(Path(folder) / entry)
    return site_dir


def _distribution_kernels() -> str:
    """The real path of the ``kernels`` distribution's package, or "absent"."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return "absent"
    return str(Path(dist.locate_file("kernels/__init__.py")).resolve())


@pytest.mark.parametrize(
    "path_entry",
    [
        "",  # python -c and python - from the root: the working directory as ''
        str(ROOT),  # python -m, scripts in the root and pytest's rootdir: its absolute path
    ],
)
def test_the_kernels_folder_never_shadows_the_kernels_distribution(path_entry) -> None:
    code = f"import sys; sys.path.insert(0, {path_entry!r})\n" + _WHICH_KERNELS
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == _distribution_kernels()


_TRANSFORMERS_HUB_KERNELS = (
    "import transformers.integrations.hub_kernels, transformers.models.vit.modeling_vit\n"
    "from transformers.utils import is_kernels_available\n"
    "print(is_kernels_available())\n"
)


def test_transformers_imports_its_kernels_from_the_repository_root() -> None:
    """transformers 5.25 imports the ``kernels`` distribution (hub kernels) when it is
    installed; from the repository root that import must not find our folder."""
    pytest.importorskip("transformers")
    code = _TRANSFORMERS_HUB_KERNELS
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == str(_distribution_kernels() != "absent")


def test_without_the_kernels_distribution_transformers_still_imports(tmp_path) -> None:
    """Where the distribution is not installed (transformers before 5.25, the GPU image),
    transformers finds our folder with ``find_spec``, sees no metadata and imports it: that
    import must succeed and tell it that no ``kernels`` is installed."""
    pytest.importorskip("transformers")
    site_dir = _site_without_kernels(tmp_path)
    # -S: no site-packages but the ones linked above (their .pth files included).
    code = f"import site; site.addsitedir({str(site_dir)!r})\n"
    for body in (_TRANSFORMERS_HUB_KERNELS, _WHICH_KERNELS):
        r = subprocess.run([sys.executable, "-S", "-c", code + body], capture_output=True,
                           text=True, cwd=ROOT)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-1] in ("False", "absent"), r.stdout


def test_the_wheel_ships_the_package_and_no_top_level_kernels(tmp_path) -> None:
    # Built from a copy: setuptools' build/ folder keeps modules deleted since and ships them.
    src = tmp_path / "src"
    for folder in ("zeta_fused", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--no-index", "-w", str(out), str(src)]  # fmt: skip
    r = subprocess.run(build, capture_output=True, text=True)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not installed")
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"zeta_fused"}
    shipped = {n for n in names if n.endswith(".py")}
    sources = {
        f"zeta_fused/{p.relative_to(ROOT / 'zeta_fused')}"
        for p in (ROOT / "zeta_fused").rglob("*.py")
    }
    sources |= {
        f"zeta_fused/kernels/{p.relative_to(ROOT / 'kernels')}"
        for p in (ROOT / "kernels").rglob("*.py")
    }
    assert shipped == sources
    # Installed on its own (outside the repository), every module imports.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import importlib, pkgutil, zeta_fused\n"
        f"assert zeta_fused.__file__.startswith({str(site)!r}), zeta_fused.__file__\n"
        "for m in pkgutil.walk_packages(zeta_fused.__path__, 'zeta_fused.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=site,
                       env={**os.environ, "PYTHONPATH": str(site)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
