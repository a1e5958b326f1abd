"""moecompress: compression and quantization for trained Mixture-of-Experts checkpoints.

    import moecompress
    model = moecompress.load("./mixtral-w4")       # a transformers causal LM with packed experts
    moecompress.quantize("./Mixtral-8x7B", "./mixtral-w4", moecompress.QuantizeConfig(bits=4))

`import moecompress` also registers quant_method "moecompress" with transformers (when transformers is
imported, not before), so `AutoModelForCausalLM.from_pretrained("./mixtral-w4")` builds the same model.
"""
__version__ = "0.1.0"


def load(path, device="cpu", dtype=None, verify=True):
    """Load a packed checkpoint as a transformers causal LM whose experts stay packed (a shortcut to
    `from_pretrained` through the moecompress quantizer, after full validation; verify: shard checksums)."""
    from .runtime import load as _load
    return _load(path, device=device, dtype=dtype, verify=verify)


def __getattr__(name):  # lazy: `import moecompress` does no work and needs neither triton nor CUDA
    if name in ("quantize", "evaluate"):
        from . import api
        return getattr(api, name)
    if name in ("QuantizeConfig", "CalibConfig"):
        from . import config
        return getattr(config, name)
    raise AttributeError(name)


from .hf_quantizer import install_import_hook as _hook  # noqa: E402  (imports nothing from transformers)

_hook()
del _hook
