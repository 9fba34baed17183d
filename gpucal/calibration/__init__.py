"""calibration room."""
