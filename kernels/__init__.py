"""The Triton kernels. They ship as the subpackage ``zeta_fused.kernels`` (pyproject.toml maps
this folder there); the wheel has no top-level ``kernels``.

This folder sits at the repository root, and ``python -m ...``, ``python -c``, pytest and scripts
run from the root put the working directory first on ``sys.path``, where this folder would
shadow the unrelated ``kernels`` distribution (Hugging Face's, which transformers imports).
Imported under that top-level name, this module hands the name to the first ``kernels`` found
elsewhere on ``sys.path``. Where there is none, ``importlib.util.find_spec("kernels")`` has
already found this folder, and libraries that probe with ``find_spec`` and then import
(transformers) must not fail: the name then gets an empty module with no file and no version,
which is what Python gives for a folder without ``__init__.py`` and how such libraries tell a
stray folder from an installed package.
"""

if __name__ == "kernels":
    import os as _os
    import sys as _sys
    from importlib.machinery import ModuleSpec as _ModuleSpec
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec
    from types import ModuleType as _ModuleType

    def _elsewhere() -> list[str]:
        root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
        return [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != root]

    _spec = _PathFinder.find_spec("kernels", _elsewhere())
    if _spec is None or _spec.loader is None:
        _empty = _ModuleType("kernels", "No 'kernels' distribution is installed.")
        _empty.__spec__ = _ModuleSpec("kernels", None)  # find_spec reads it once imported
        _sys.modules["kernels"] = _empty  # what the import statement returns
    else:
        _module = _module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del _sys.modules["kernels"]
            raise
