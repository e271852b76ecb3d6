"""Big tensors on disk during a compile: what goes in comes back bit for bit, and nothing stays in memory."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from qcompile import scratch


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, ml_dtypes.int4, ml_dtypes.uint4, ml_dtypes.float8_e4m3fn])
def test_big_tensors_go_to_the_scratch_file_and_read_back_exactly(tmp_path, dtype):
    rng = np.random.default_rng(0)
    big = rng.integers(-8, 8, size=(512, 257)).astype(dtype)  # odd element count: 4-bit packing pads
    small = np.arange(10, dtype=np.float32)
    with scratch.into(tmp_path):
        kept, spilled = scratch.tensor(small, "small"), scratch.tensor(big, "big")
    assert not isinstance(kept, ir.LazyTensor)
    assert isinstance(spilled, ir.LazyTensor) and spilled.name == "big"
    assert spilled.dtype == ir.DataType.from_numpy(np.dtype(dtype)) and spilled.shape == ir.Shape(big.shape)
    np.testing.assert_array_equal(spilled.numpy().astype(np.float32), big.astype(np.float32))
    assert spilled.tobytes() == ir.Tensor(big).tobytes()  # what ir.save writes
    assert (tmp_path / "tensors.bin").stat().st_size >= ir.Tensor(big).nbytes


def test_outside_a_scratch_folder_tensors_stay_in_memory():
    assert not isinstance(scratch.tensor(np.zeros((1024, 1024), np.float32)), ir.LazyTensor)


def test_unmapped_reads_the_same_values_without_a_memory_map(tmp_path):
    weight = np.random.default_rng(1).standard_normal((256, 128)).astype(np.float32)
    graph = ir.Graph([], [], nodes=[], name="g")
    graph.register_initializer(ir.Value(name="w", const_value=ir.tensor(weight, name="w")))
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "m.onnx", external_data="m.onnx.data")
    model = scratch.unmapped(ir.load(tmp_path / "m.onnx"))
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.LazyTensor)
    np.testing.assert_array_equal(tensor.numpy(), weight)
