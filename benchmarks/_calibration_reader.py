"""The calibration input the ONNX Runtime quantizers (peers) take: prompt passes over token windows."""

from __future__ import annotations

import pathlib

import numpy as np

from qcompile import runtime


class WindowsReader:
    """onnxruntime.quantization CalibrationDataReader over token windows (prompt pass, empty cache).

    `get_next` serves quantize_static; ORT's GPTQ iterates a deep copy of the reader instead."""

    def __init__(self, path: pathlib.Path, windows: np.ndarray):
        decoder = runtime.Decoder(path)
        self.feeds = [decoder.feeds(w[None], decoder.empty_cache(), 0) for w in windows]
        self._next = iter(self.feeds)

    def get_next(self):
        return next(self._next, None)

    def __iter__(self):
        return iter(self.feeds)
