"""Big tensors live on disk while a compile runs, so that its memory does not grow with the model.

Inside `scratch.into(folder)`, `scratch.tensor(array)` writes an array of at least `THRESHOLD` bytes to a
scratch file there and returns a tensor that reads it back whenever its values are asked for (an
`ir.LazyTensor`); `scratch.unmapped(model)` turns a loaded model's memory-mapped external weights into the
same kind of tensor. Both read with plain file reads: a memory map's pages, once touched, count as the
process's resident memory until the map is closed, so reading every weight of an 8B model through
onnx_ir's `ExternalTensor` holds the model in RSS; a file read holds only the array the caller keeps.
Outside `scratch.into`, `scratch.tensor` returns an ordinary in-memory tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import pathlib

import numpy as np
import onnx_ir as ir

THRESHOLD = 64 << 10  # smaller tensors (norm gains, scales of small layers) stay in memory
_FILE: contextvars.ContextVar = contextvars.ContextVar("qcompile_scratch", default=None)


@dataclasses.dataclass(frozen=True)
class _FileRead:
    """Reads `nbytes` at `offset` of `path` as a tensor of `dtype` and `shape` (2- and 4-bit types packed)."""

    path: str
    offset: int
    nbytes: int
    dtype: ir.DataType
    shape: tuple[int, ...]

    def __call__(self) -> ir.TensorProtocol:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            raw = np.fromfile(f, np.uint8, count=self.nbytes)
        if self.dtype.bitwidth < 8:
            return ir.PackedTensor(raw, self.dtype, shape=self.shape)
        return ir.Tensor(raw.view(self.dtype.numpy()).reshape(self.shape), dtype=self.dtype)


def _lazy(read: _FileRead, name: str | None) -> ir.LazyTensor:
    return ir.LazyTensor(read, dtype=read.dtype, shape=ir.Shape(read.shape), name=name)


@contextlib.contextmanager
def into(folder: pathlib.Path):
    """Within this context, big tensors made by `tensor` go to a scratch file in `folder` (the caller removes it)."""
    with open(folder / "tensors.bin", "ab") as file:
        token = _FILE.set(file)
        try:
            yield
        finally:
            _FILE.reset(token)


def tensor(array: np.ndarray, name: str | None = None) -> ir.TensorProtocol:
    """`array` as a tensor: written to the active scratch file (see `into`) when it is big, else in memory."""
    t = ir.Tensor(array, name=name)
    file = _FILE.get()
    if file is None or t.nbytes < THRESHOLD:
        return t
    offset = file.tell()
    file.write(t.tobytes())
    file.flush()
    return _lazy(_FileRead(file.name, offset, t.nbytes, t.dtype, tuple(t.shape.numpy())), name)


def unmapped(model: ir.Model) -> ir.Model:
    """Replace `model`'s big memory-mapped external initializers by file-reading tensors (in place); returns it."""
    for value in model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor) and t.nbytes >= THRESHOLD:
            value.const_value = _lazy(_FileRead(str(t.path), t.offset or 0, t.nbytes, t.dtype, tuple(t.shape.numpy())), t.name)
            t.release()
    return model
