"""moecompress: compression and quantization for trained Mixture-of-Experts checkpoints.

    import moecompress
    model = moecompress.load("./mixtral-w4")       # a transformers causal LM with packed experts
    moecompress.quantize("./Mixtral-8x7B", "./mixtral-w4", moecompress.QuantizeConfig(bits=4))
"""
__version__ = "0.1.0"


def _unshadow_kernels() -> None:
    """Keep the checkout's `kernels/` (and benchmarks/kernels.py) from shadowing Hugging Face's `kernels`.

    `kernels/` is installed as `moecompress.kernels`, but with the checkout itself on sys.path (`python -m
    pytest` or a REPL in the project root, `python cli.py`, `python benchmarks/X.py`) a plain `import
    kernels` finds it (or the kernel benchmark), and transformers, which requires Hugging Face's `kernels`
    since 5.25 and imports it from its activations module, fails with "cannot import name
    'CUDAProperties' from 'kernels'". So when `kernels` would resolve inside the checkout and nothing of
    that name is loaded yet, load the installed package with the checkout's folders off the path;
    transformers then finds it in sys.modules.
    """
    import importlib.util
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "kernels" in sys.modules or not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return

    def inside(p: str) -> bool:
        p = os.path.abspath(p or os.curdir)
        return p == root or p.startswith(root + os.sep)
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or not inside(spec.origin or ""):
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not inside(p)]
    try:
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    except Exception:  # a broken optional package: transformers will report it, not us
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_unshadow_kernels()


def load(path, device="cpu", dtype=None):
    """Load a packed checkpoint as a transformers causal LM whose experts stay packed."""
    from .runtime import load as _load
    return _load(path, device=device, dtype=dtype)


def __getattr__(name):  # lazy: `import moecompress` does no work and needs neither triton nor CUDA
    if name in ("quantize", "evaluate"):
        from . import api
        return getattr(api, name)
    if name in ("QuantizeConfig", "CalibConfig"):
        from . import config
        return getattr(config, name)
    raise AttributeError(name)
