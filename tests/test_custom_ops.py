"""qcompile's function ops: their ONNX bodies (run by onnx.reference and by ONNX Runtime) equal the numpy
references the passes are written against."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import reference

from qcompile import custom_ops
from qcompile.algorithms.smoothquant import quantize_per_token


def quantize_asymmetric_rows(x: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric fake quantization, one scale and zero point per row (the KV cache's reference)."""
    levels = np.float32(2 ** bits - 1)
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    scale = np.maximum((hi - lo) / levels, np.float32(1e-12))
    zp = np.rint(-lo / scale)
    return (np.clip(np.rint(x / scale) + zp, 0, levels) - zp) * scale


def _run_both(op_type: str, make_node, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    value = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(x.shape)))
    node = make_node(value)
    graph = ir.Graph([value], node.outputs, nodes=[node], opset_imports={"": 21}, name="g")
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
def test_asymmetric_op_matches_numpy(bits):
    x = (np.random.default_rng(1).standard_normal((1, 3, 7, 16)) + 2.0).astype(np.float32)  # off-centre rows
    want = quantize_asymmetric_rows(x, bits)
    assert max(len(np.unique(row)) for row in want.reshape(-1, 16)) <= 2 ** bits
    step = (x.max(-1) - x.min(-1)) / (2 ** bits - 1)
    assert (np.abs(want - x).max(-1) <= step / 2 + 1e-6).all()  # the min and max are on the grid: no clipping
    for got in _run_both(custom_ops.ASYMMETRIC, lambda v: custom_ops.asymmetric_node(v, bits, "y"), x):
        np.testing.assert_allclose(got, want, atol=1e-5)
