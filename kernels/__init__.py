"""Triton decode kernels (installed as moecompress.kernels)."""
