"""Calibration data, samplers and routing statistics (installed as moecompress.calibration)."""
