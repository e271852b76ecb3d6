"""A checkpoint's tensors, read one at a time as numpy arrays, for the streaming export.

The export traces the model without its weights (parameters never initialised) and writes each
initializer straight from here, so memory holds one tensor at a time whatever the model's size:

- `SafetensorsWeights`: a HF folder's `*.safetensors` shards, read with plain file reads (no memory map,
  so the pages read stay in the page cache, not in the process's resident memory); bf16/fp16 tensors are
  upcast to float32 as they are read.
- `GGUFWeights`: a GGUF file's tensors, dequantized one at a time and un-permuted as transformers does
  (its name map and tensor processors).
- `ModuleWeights`: an in-memory torch module's parameters and buffers (a model the caller built, or a
  checkpoint whose names transformers renames while loading).

Each gives the checkpoint's tensor names and shapes (`shapes()`) and reads one tensor (`read(name, perm)`),
float tensors as float32, transposed by `perm` if given (before widening, so the transient copy is the narrow one).
"""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np

from qcompile import errors

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                       "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsWeights:
    """The tensors of a folder's safetensors files (one file, or shards listed in an index)."""

    def __init__(self, folder: pathlib.Path):
        self._entries: dict[str, tuple[pathlib.Path, str, tuple[int, ...], int, int]] = {}
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    if length > path.stat().st_size:
                        raise ValueError("header length past the end")
                    header = json.loads(f.read(length))
                entries = {name: (path, info["dtype"], tuple(info["shape"]), 8 + length + info["data_offsets"][0],
                                  info["data_offsets"][1] - info["data_offsets"][0])
                           for name, info in header.items() if name != "__metadata__"}
            except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
                raise errors.CorruptModelError(f"'{path}' is not a readable safetensors file ({type(e).__name__}): "
                                               "re-download or re-save the checkpoint") from None
            size = path.stat().st_size
            if any(offset + n > size for _, _, _, offset, n in entries.values()):
                raise errors.CorruptModelError(f"'{path}' is truncated ({size} bytes, shorter than its header says): "
                                               "re-download or re-save the checkpoint")
            unknown = {dtype for _, dtype, *_ in entries.values()} - {*_SAFETENSORS_DTYPES, "BF16"}
            if unknown:
                raise errors.UnsupportedModelError(f"'{path}' holds {', '.join(sorted(unknown))} tensors, which qcompile "
                                                   "does not read: export from a bf16, fp16 or fp32 checkpoint")
            self._entries.update(entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry[2] for name, entry in self._entries.items()}

    def read(self, name: str, perm: tuple[int, ...] | None = None) -> np.ndarray:
        path, dtype, shape, offset, size = self._entries[name]
        stored = np.uint16 if dtype == "BF16" else _SAFETENSORS_DTYPES[dtype]
        with open(path, "rb") as f:
            f.seek(offset)
            values = np.fromfile(f, stored, count=size // np.dtype(stored).itemsize).reshape(shape)
        values = _transposed(values, perm)  # before widening: the transient copy is the narrow one
        if dtype != "BF16":
            return values.astype(np.float32) if values.dtype.kind == "f" else values
        widened = np.empty(values.shape, np.uint32)  # bfloat16 is float32's top half: widening is exact
        widened[...] = values
        widened <<= 16
        return widened.view(np.float32)


class GGUFWeights:
    """The tensors of a GGUF file under the HF names of `meta_model` (a model of the file's config)."""

    def __init__(self, path: pathlib.Path, meta_model):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                              load_gguf_checkpoint, read_field)

        self._reader = GGUFReader(path)
        self._config = load_gguf_checkpoint(path)["config"]
        architecture = read_field(self._reader, "general.architecture")[0]
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self._config)
        self._map = get_gguf_hf_weights_map(meta_model, self._processor)  # GGUF name -> HF name
        self._tensors = {self._map[t.name]: t for t in self._reader.tensors if t.name in self._map}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._tensors.items()}  # GGUF lists dims fastest first

    def read(self, name: str, perm: tuple[int, ...] | None = None) -> np.ndarray:
        from gguf import dequantize

        tensor = self._tensors[name]
        values = dequantize(tensor.data, tensor.tensor_type)
        processed = self._processor.process(weights=values, name=tensor.name, tensor_key_mapping=self._map,
                                            parsed_parameters={"config": self._config, "tensors": {}})
        return _transposed(np.asarray(processed.weights), perm)


class ModuleWeights:
    """The parameters and buffers of an in-memory torch module."""

    def __init__(self, module):
        self._tensors = {**dict(module.named_parameters(remove_duplicate=False)),
                         **dict(module.named_buffers(remove_duplicate=False))}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self._tensors.items()}

    def read(self, name: str, perm: tuple[int, ...] | None = None) -> np.ndarray:
        import torch

        tensor = self._tensors[name].detach()
        tensor = tensor.permute(perm) if perm is not None else tensor
        return (tensor.to(torch.float32) if tensor.is_floating_point() else tensor).contiguous().numpy().copy()


def _transposed(values: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    return values if perm is None else np.ascontiguousarray(values.transpose(perm))
