"""The module paths of zeta-fused 0.1.0.dev0, before the package was split into ``op``, ``nn``
and ``integrations``: models pickled then (``torch.save(model)``) name fused classes and
functions by those paths. Importing such a path gives a stand-in module that finds each name
where it lives now; nothing imports these paths otherwise."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# Old module -> the modules that now hold its names, searched in order.
MOVED: dict[str, tuple[str, ...]] = {
    "zeta_fused.op_args": ("zeta_fused.op.args",),
    "zeta_fused.ops": ("zeta_fused.op.register",),
    "zeta_fused.launch": ("zeta_fused.op.launch",),
    "zeta_fused.layout": ("zeta_fused.op.layout",),
    "zeta_fused.policy": ("zeta_fused.op.policy",),
    "zeta_fused.reference": ("zeta_fused.op.reference",),
    "zeta_fused.module": ("zeta_fused.nn.patch_embed",),
    "zeta_fused.stem_module": ("zeta_fused.nn.vit_stem",),
    "zeta_fused.stems": ("zeta_fused.integrations._base", "zeta_fused.integrations.convert"),
    "zeta_fused.peers": (
        "zeta_fused.integrations.convs",
        "zeta_fused.integrations.timm",
        "zeta_fused.integrations._base",
    ),  # fmt: skip
    "zeta_fused.convert": ("zeta_fused.integrations.convert",),
    "zeta_fused.stems_timm": ("zeta_fused.integrations.timm",),
    "zeta_fused.stems_hf": (
        "zeta_fused.integrations.transformers",
        "zeta_fused.integrations.transformers_clip",
    ),  # fmt: skip
    "zeta_fused.stems_other": (
        "zeta_fused.integrations.vit_pytorch",
        "zeta_fused.integrations.open_clip",
        "zeta_fused.integrations.segment_anything",
    ),  # fmt: skip
    "zeta_fused.stems_diffusion": ("zeta_fused.integrations.diffusers",),
}
# Names that changed with the move: (old module, old name) -> new name.
RENAMED = {("zeta_fused.stems", "_HandoffLayerNorm"): "_HandoffNorm"}


class _Moved(types.ModuleType):
    """A stand-in for an old module: each name is looked up where it lives now."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        name = RENAMED.get((self.__name__, name), name)
        for where in MOVED[self.__name__]:
            module = importlib.import_module(where)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (moved) has no attribute {name!r}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ARG002 - the protocol's
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return _Moved(spec.name)

    def exec_module(self, module):
        pass


def install() -> None:
    """Make the old paths importable (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
