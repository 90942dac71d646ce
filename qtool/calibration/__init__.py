"""Calibration: sample text, run the model block by block, collect what calibration-aware methods need.

Public entry points (the CLI wires them):
- :func:`calibrate` (``qtool calibrate MODEL -o stats.safetensors``) with :func:`save_stats` / :func:`load_stats`;
- :func:`calibrated_weights` (``qtool quantize --method rtn|imatrix|gptq --calib ... | --stats ...``).
"""
from qtool.calibration.data import DEFAULT_CALIB, DEFAULT_SAMPLES, DEFAULT_SEQLEN, CalibrationSet, calibration_set
from qtool.calibration.methods import METHODS, CalibratedTensor, MethodOptions, OverlaySource, calibrated_weights
from qtool.calibration.observers import InputStats
from qtool.calibration.runner import CalibrationStats, LayerRecord, calibrate, load_stats, save_stats, walk_blocks

__all__ = [
    "DEFAULT_CALIB", "DEFAULT_SAMPLES", "DEFAULT_SEQLEN", "CalibrationSet", "calibration_set",
    "METHODS", "CalibratedTensor", "MethodOptions", "OverlaySource", "calibrated_weights",
    "InputStats", "CalibrationStats", "LayerRecord", "calibrate", "load_stats",
    "save_stats", "walk_blocks",
]
