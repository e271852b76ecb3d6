"""Calibrate: one ONNX Runtime run over the calibration windows for every pass that needs statistics."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx_ir as ir

from qcompile import calibration
from qcompile.calibration import Request, TapStats
from qcompile.passes._result import Result


class Calibrated(Protocol):
    """A pass that takes its statistics from a shared calibration run."""

    def calibration_request(self, model: ir.Model) -> Request | list[Request]: ...

    def calibrated(self, stats: dict[str, TapStats], request: Request | list[Request]) -> None: ...


class Calibrate(ir.passes.InPlacePass):
    """Run the model once over `windows` with the taps every pass in `consumers` asks for (each pass's
    `calibration_request`), and hand each its statistics (`calibrated`) before it runs. The model is not
    changed. The consumers run after this pass on the same graph, so the taps are the values they read;
    a pass that changes its own inputs' statistics keeps them exact itself (SmoothQuant's x/s).
    Passes that need the partly quantized model (sequential GPTQ) are not consumers: they run their own."""

    def __init__(self, windows: np.ndarray, consumers: list[Calibrated], progress=None, label: str = "Calibrating"):
        super().__init__()
        self.windows, self.consumers, self.progress, self.label = windows, consumers, progress, label

    def call(self, model: ir.Model) -> Result:
        requests = [c.calibration_request(model) for c in self.consumers]
        flat = [r for request in requests for r in (request if isinstance(request, list) else [request])]
        stats, _ = calibration.run(model, flat, self.windows, self.progress, self.label)
        for consumer, request in zip(self.consumers, requests):
            consumer.calibrated(stats, request)
        return Result(model, modified=False, record={"windows": int(len(self.windows)),
                                                     "for": [type(c).__name__ for c in self.consumers]})
