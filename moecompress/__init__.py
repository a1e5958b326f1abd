"""moecompress: compression and quantization for trained Mixture-of-Experts checkpoints."""
__version__ = "0.1.0"
