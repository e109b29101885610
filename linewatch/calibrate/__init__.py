"""Thresholds without retraining (torch-free): the maths, the calibration file and `linewatch calibrate`.

`from linewatch.calibrate import load_calibration, write_calibration` is the documented entry point.
"""

from linewatch.calibrate.store import Calibration, load_calibration, write_calibration

__all__ = ["Calibration", "load_calibration", "write_calibration"]
