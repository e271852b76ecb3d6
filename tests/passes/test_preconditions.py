"""Passes check their preconditions in requires(), before any change: a model they refuse is left as it was.

Most broken models here fail only in their second block, where the checks used to run half-way through
call(), after the first block had been rewritten.
"""

import re

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, custom_ops, errors
from qcompile.calibration import TapStats
from qcompile.passes import InsertOnlineHadamard, InsertQueryKeyHadamard, QuantizeKVCache, RotateValueOutput
from qcompile.passes._fold import set_tensor
from tests.conftest import single_matmul_model

R = analysis.Role
FLOAT = ir.TensorType(ir.DataType.FLOAT)


def _serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def _refused_unchanged(pass_, model: ir.Model, match: str) -> BaseException:
    """Runs `pass_` on `model`: it must raise an error whose message (or its cause's) matches `match`, and
    leave the model byte-for-byte as it was."""
    before = _serialized(model)
    with pytest.raises((ir.passes.PreconditionError, errors.UnsupportedModelError)) as info:
        pass_(model)
    assert any(re.search(match, str(e)) for e in (info.value, info.value.__cause__) if e is not None), info.value
    assert isinstance(info.value, errors.InputError)  # not wrapped: the CLI prints it as a one-line input error
    assert _serialized(model) == before
    return info.value


def _tiny(tiny_export) -> ir.Model:
    _, path = tiny_export("llama")
    return ir.load(path)


def _block(model: ir.Model, index: int) -> analysis.Block:
    return analysis.analyze(model).blocks[index]


def _quantize_weight(model: ir.Model, linear: analysis.Linear) -> None:
    """W → DequantizeLinear(q int8, scale) per channel: the linear looks already quantized."""
    def constant(name, array):
        tensor = ir.tensor(array)
        return ir.Value(name=f"{linear.name}.{name}", type=ir.TensorType(tensor.dtype), shape=tensor.shape,
                        const_value=tensor)

    k, n = linear.float_weight().shape
    q, scale = constant("q", np.zeros((k, n), np.int8)), constant("scale", np.ones(n, np.float32))
    model.graph.register_initializer(q)
    model.graph.register_initializer(scale)
    dq = ir.node("DequantizeLinear", [q, scale], attributes={"axis": 1})
    model.graph.insert_before(linear.node, dq)
    linear.node.replace_input_with(1, dq.outputs[0])


def _kv_cache_model(value_is_concat: bool = True) -> ir.Model:
    """present.0.key = Concat(past key, new); present.0.value = Concat(past value, new), or Identity(new)."""
    past = [ir.Value(name=f"past_key_values.0.{kind}", type=FLOAT, shape=ir.Shape([1, 2, "past", 16]))
            for kind in ("key", "value")]
    new = ir.Value(name="new", type=FLOAT, shape=ir.Shape([1, 2, "seq", 16]))
    key = ir.node("Concat", [past[0], new], attributes={"axis": 2})
    value = ir.node("Concat", [past[1], new], attributes={"axis": 2}) if value_is_concat else ir.node("Identity", [new])
    for node, kind in ((key, "key"), (value, "value")):
        node.outputs[0].name = f"present.0.{kind}"
        node.outputs[0].type = FLOAT
    graph = ir.Graph([*past, new], [key.outputs[0], value.outputs[0]], nodes=[key, value], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


# QuantizeKVCache

def test_kv_cache_quantization_refuses_a_cache_output_that_is_not_a_concat():
    model = _kv_cache_model(value_is_concat=False)  # the key's Concat comes first: it was rewritten before the raise
    _refused_unchanged(QuantizeKVCache(4), model, r"cache output 'present\.0\.value' is not Concat\(past, new\)")


def test_kv_cache_quantization_refuses_a_model_without_cache_outputs():
    _refused_unchanged(QuantizeKVCache(8), single_matmul_model(), r"no KV-cache outputs \(present\.\*\)")


def test_kv_cache_quantization_of_a_valid_cache():
    model = _kv_cache_model()
    kv = QuantizeKVCache(4)
    kv.requires(model)
    (request,) = kv.calibration_request(model)  # no attention blocks: no queries to tap, no key transform
    assert [t.name for t in request.taps] == ["new", "new"]
    kv.calibrated({"new": TapStats(np.full(32, 0.7, np.float32), np.zeros(32), None, np.zeros(32))}, None)
    assert kv(model).modified
    assert [n.op_type for n in model.graph].count(custom_ops.STATIC) == 2


# RotateValueOutput

def test_value_rotation_refuses_value_columns_that_are_not_whole_heads(tiny_export):
    model = _tiny(tiny_export)
    v = _block(model, 1).linears[R.V]
    set_tensor(v.weight_input, np.zeros((v.in_features, 40)))  # 40 columns: not whole heads of 16
    _refused_unchanged(RotateValueOutput(), model,
                       r"blocks\.1\.v: 40 value columns / 64 o rows are not whole heads of 16")


def test_value_rotation_refuses_an_unknown_head_size(tiny_export):
    model = _tiny(tiny_export)
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values."):
            value.shape = ir.Shape([*value.shape[:3], "head_dim"])
    _refused_unchanged(RotateValueOutput(), model, r"the head size is unknown")


def test_value_rotation_refuses_an_already_quantized_o(tiny_export):
    model = _tiny(tiny_export)
    _quantize_weight(model, _block(model, 1).linears[R.O])
    _refused_unchanged(RotateValueOutput(), model, r"linear blocks\.1\.o is already quantized")


def test_value_rotation_of_a_valid_model(tiny_export):
    model = _tiny(tiny_export)
    RotateValueOutput().requires(model)
    assert RotateValueOutput()(model).modified


# InsertOnlineHadamard

def test_online_hadamard_refuses_an_order_without_a_known_hadamard(tiny_export):
    model = _tiny(tiny_export)
    down = _block(model, 1).linears[R.DOWN]
    set_tensor(down.weight_input, np.zeros((127, down.out_features)))  # 127 rows: no Hadamard matrix of that order
    _refused_unchanged(InsertOnlineHadamard(), model, r"no Hadamard matrix of order 127 is known")


def test_online_hadamard_refuses_an_already_quantized_linear(tiny_export):
    model = _tiny(tiny_export)
    _quantize_weight(model, _block(model, 1).linears[R.O])
    _refused_unchanged(InsertOnlineHadamard((R.DOWN, R.O)), model, r"linear blocks\.1\.o is already quantized")


def test_online_hadamard_of_a_valid_model(tiny_export):
    model = _tiny(tiny_export)
    InsertOnlineHadamard((R.DOWN, R.O)).requires(model)
    assert InsertOnlineHadamard((R.DOWN, R.O))(model).modified
    assert [n.op_type for n in model.graph].count(custom_ops.HADAMARD) == 2 * 2


def test_online_hadamard_without_roles_changes_nothing(tiny_export):
    model = _tiny(tiny_export)
    before = _serialized(model)
    assert not InsertOnlineHadamard(roles=())(model).modified
    assert _serialized(model) == before


# InsertQueryKeyHadamard

def test_query_key_hadamard_refuses_a_block_without_a_kv_cache(tiny_export):
    model = _tiny(tiny_export)
    kept = [v for v in model.graph.outputs if not v.name.startswith("present.1.")]
    model.graph.outputs.clear()
    model.graph.outputs.extend(kept)  # block 0 keeps its cache, block 1 has none
    _refused_unchanged(InsertQueryKeyHadamard(), model, r"do not come from a KV-cache Concat\(past, new\)")


def test_query_key_hadamard_refuses_a_dynamic_key_head_size(tiny_export):
    model = _tiny(tiny_export)
    concat = next(v for v in model.graph.outputs if v.name == "present.1.key").producer()
    new_key = concat.inputs[1]
    new_key.shape = ir.Shape([*new_key.shape[:3], "head_dim"])
    _refused_unchanged(InsertQueryKeyHadamard(), model, r"block 1: the key head size is not static")


def test_query_key_hadamard_of_a_valid_model(tiny_export):
    model = _tiny(tiny_export)
    InsertQueryKeyHadamard().requires(model)
    assert InsertQueryKeyHadamard()(model).modified
    assert [n.op_type for n in model.graph].count(custom_ops.HADAMARD) == 2 * 2  # query and key, 2 blocks
