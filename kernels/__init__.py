"""tmps's Triton kernels. This folder installs as ``tmps.kernels`` (pyproject's package-dir).

In a checkout whose root is on ``sys.path`` (``python -m pytest``, ``python -c``, ``PYTHONPATH=.``)
the folder is also importable as the top-level ``kernels``, a name that belongs to Hugging Face's
``kernels`` distribution: transformers 5.25 requires it and imports it with its first model
(``from kernels import CUDAProperties, ...``), which this folder would shadow. Imported under that
name, it hands the import over to the installed distribution if there is one (the import system
returns whatever ``sys.modules["kernels"]`` holds once this file has run); with none, it stays
this empty package, which transformers finds without a version and ignores.
"""

if __name__ == "kernels":
    import importlib.util as _util
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder
    from pathlib import Path as _Path

    _checkout = _Path(__file__).resolve().parent.parent
    _spec = _PathFinder.find_spec("kernels", [p for p in _sys.path if _Path(p or ".").resolve() != _checkout])
    if _spec is not None and _spec.origin is not None and _spec.loader is not None:  # a real one, not a bare folder
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
