"""The Triton kernels. They ship as the subpackage ``zeta_fused.kernels`` (pyproject.toml maps
this folder there); the wheel has no top-level ``kernels``.

This folder sits at the repository root, and ``python -m ...``, ``python -c``, pytest and scripts
run from the root put the working directory first on ``sys.path``, where this folder would
shadow the unrelated ``kernels`` distribution (Hugging Face's, which transformers imports).
Imported under that top-level name, this module hands the name to the first ``kernels`` found
elsewhere on ``sys.path``, or raises ``ModuleNotFoundError`` as if the folder were not there.
"""

if __name__ == "kernels":
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec

    def _elsewhere() -> list[str]:
        root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
        return [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != root]

    _spec = _PathFinder.find_spec("kernels", _elsewhere())
    if _spec is None or _spec.loader is None:
        del _sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = _module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del _sys.modules["kernels"]
        raise
