"""Calibration data: seeded token windows from local files or hub datasets."""

from .data import (
    DataSpec,
    Windows,
    check_window_length,
    default_seq_len,
    embedded_sample_path,
    first_choosing_position,
    make_windows,
    windows_from_tensor,
)

__all__ = [
    "DataSpec",
    "Windows",
    "check_window_length",
    "default_seq_len",
    "embedded_sample_path",
    "first_choosing_position",
    "make_windows",
    "windows_from_tensor",
]
