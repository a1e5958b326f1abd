"""moecompress: compression and quantization for trained Mixture-of-Experts checkpoints.

    import moecompress
    model = moecompress.load("./mixtral-w4")       # a transformers causal LM with packed experts
    moecompress.quantize("./Mixtral-8x7B", "./mixtral-w4", moecompress.QuantizeConfig(bits=4))
"""
__version__ = "0.1.0"


def _unshadow_kernels() -> None:
    """Keep the checkout's top-level `kernels/` from shadowing Hugging Face's `kernels` package.

    `kernels/` is installed as `moecompress.kernels`, but with the checkout itself on sys.path (`python -m
    pytest` or a REPL in the project root, `python cli.py`, the benchmarks) a plain `import kernels`
    finds it, and transformers (which requires Hugging Face's `kernels` since 5.25 and imports it from
    its activations module) fails with "cannot import name 'CUDAProperties' from 'kernels'". So when the
    checkout is on the path and nothing named `kernels` is loaded yet, load the installed one with the
    checkout off the path; transformers then finds it in sys.modules.
    """
    import importlib.util
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "kernels" in sys.modules or not os.path.isfile(os.path.join(root, "kernels", "__init__.py")) \
            or not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return

    def is_root(p: str) -> bool:
        return os.path.abspath(p or os.curdir) == root
    if not any(is_root(p) for p in sys.path):
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not is_root(p)]
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
