"""Calibration: run ONNX Runtime on a graph with taps on chosen tensors and stream statistics.

For every tapped tensor x (flattened to [tokens, K]) it accumulates, window by window, the per-channel
max |x| and mean |x| and, if asked, the Hessian H = Σ xᵀx in float64 — never holding the activations of
more than one window. Linears that read the same tensor (q/k/v, gate/up) share one tap.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile

import numpy as np
import onnx_ir as ir

from qcompile import errors, evaluation
from qcompile.runtime import Decoder

DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512


@dataclasses.dataclass
class TapStats:
    absmax: np.ndarray  # [K]
    abssum: np.ndarray  # [K], Σ|x| (float64)
    hessian: np.ndarray | None  # [K, K], Σ xᵀx (float64)
    tokens: int = 0

    @property
    def absmean(self) -> np.ndarray:
        return self.abssum / max(self.tokens, 1)

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1])
        np.maximum(self.absmax, np.abs(x).max(axis=0), out=self.absmax)
        self.abssum += np.abs(x).sum(axis=0, dtype=np.float64)
        if self.hessian is not None:
            self.hessian += (x.T @ x).astype(np.float64)  # one window in float32, the sum in float64
        self.tokens += x.shape[0]


def calibration_windows(tokenizer, file: str | pathlib.Path | None = None, samples: int = DEFAULT_SAMPLES,
                        seqlen: int = DEFAULT_SEQLEN) -> np.ndarray:
    """[samples, seqlen] token windows: WikiText-2 valid.txt by default, or a text / JSONL file
    (one {"text": ...} per line), cut into consecutive non-overlapping windows."""
    if file is None:
        text = evaluation.wikitext("valid")
    else:
        path = pathlib.Path(file)
        if not path.is_file():
            raise errors.SourceNotFoundError(f"calibration file '{file}' not found")
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            try:
                text = "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
            except (json.JSONDecodeError, KeyError, TypeError):
                raise errors.InputError(f"'{file}': every JSONL line must be an object with a \"text\" field") from None
        else:
            text = raw
    ids = np.array(tokenizer.encode(text).ids, dtype=np.int64)
    available = len(ids) // seqlen
    if available == 0:
        raise errors.InputError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}: give more text or a smaller --calib-seqlen"
        )
    if samples > available:
        raise errors.InputError(
            f"calibration text has {available} windows of {seqlen} tokens, fewer than --calib-samples {samples}: "
            "give more text or ask for fewer samples"
        )
    return ids[: samples * seqlen].reshape(samples, seqlen)


def collect(model: ir.Model, taps: list[ir.Value], windows: np.ndarray, hessian: bool = True,
            progress=None, label: str = "Calibrating") -> dict[str, TapStats]:
    """Statistics of `taps` (values of `model`) over `windows`; keyed by value name.

    The model is saved once to a temporary folder with the taps as extra outputs; ORT then computes only
    what the taps need (a tap-only run skips lm_head).
    """
    names = [t.name for t in taps]
    added = [t for t in taps if t not in model.graph.outputs]
    with tempfile.TemporaryDirectory(prefix="qcompile-calib-") as tmp:
        model.graph.outputs.extend(added)
        try:
            ir.save(model, pathlib.Path(tmp) / "model.onnx", external_data="model.onnx.data")
        finally:
            for _ in added:
                model.graph.outputs.pop()
        decoder = Decoder(pathlib.Path(tmp) / "model.onnx")
        stats: dict[str, TapStats] = {}
        advance = progress.task(label, len(windows)) if progress else (lambda: None)
        for window in windows:
            outputs = decoder.session.run(names, decoder.feeds(window[None], decoder.empty_cache(), 0))
            for name, x in zip(names, outputs):
                if name not in stats:
                    k = x.shape[-1]
                    stats[name] = TapStats(np.zeros(k, np.float32), np.zeros(k, np.float64),
                                           np.zeros((k, k), np.float64) if hessian else None)
                stats[name].add(x)
            advance()
        del decoder
    return stats
