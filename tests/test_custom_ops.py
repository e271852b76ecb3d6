"""qcompile's function ops: their ONNX bodies (run by onnx.reference and by ONNX Runtime) equal the numpy
references the passes are written against."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import reference

from qcompile import custom_ops
from qcompile.algorithms.smoothquant import quantize_per_token


def _run_both(op_type: str, make_node, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    value = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(x.shape)))
    node = make_node(value)
    constants = [v for v in node.inputs if v.const_value is not None]
    graph = ir.Graph([value], node.outputs, nodes=[node], initializers=constants, opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    custom_ops.register(model, op_type)
    proto = ir.serde.serialize_model(model)
    (by_reference,) = reference.ReferenceEvaluator(proto).run(None, {"x": x})
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (by_ort,) = session.run(None, {"x": x})
    return by_reference, by_ort


@pytest.mark.parametrize("qmax, clip", [(127.0, 1.0), (7.0, 1.0), (7.0, 0.9)])
def test_per_token_op_matches_numpy(qmax, clip):
    x = (np.random.default_rng(0).standard_normal((2, 5, 64)) * [[[1.0] * 63 + [30.0]]]).astype(np.float32)
    want = quantize_per_token(x, qmax, clip)
    for got in _run_both(custom_ops.PER_TOKEN, lambda v: custom_ops.per_token_node(v, qmax, "y", clip), x):
        np.testing.assert_allclose(got, want, atol=1e-5)
    levels = {len(np.unique(np.rint(row / np.abs(row).max() * qmax / clip))) for row in want.reshape(-1, 64)}
    assert max(levels) <= 2 * qmax + 1


@pytest.mark.parametrize("bits", [4, 8])
def test_static_op_matches_numpy(bits):
    """Symmetric with a given scale per (head, channel), saturating at [-qmax-1, qmax]: GQA's quantized cache."""
    x = (np.random.default_rng(1).standard_normal((1, 3, 7, 16)) * 2).astype(np.float32)
    scale = np.random.default_rng(2).uniform(0.01, 0.1, (1, 3, 1, 16)).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    want = np.clip(np.rint(x / scale), -qmax - 1, qmax) * scale
    assert (np.abs(x / scale) > qmax + 1).any()  # some values saturate
    scale_value = ir.Value(name="scale", const_value=ir.tensor(scale, name="scale"))
    for got in _run_both(custom_ops.STATIC, lambda v: custom_ops.static_node(v, scale_value, bits, "y"), x):
        np.testing.assert_allclose(got, want, atol=1e-6)