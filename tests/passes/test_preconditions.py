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


# QuantizeKVCache

def test_kv_cache_quantization_refuses_a_block_whose_values_skip_the_cache(tiny_export):
    model = _tiny(tiny_export)
    concat = next(v for v in model.graph.outputs if v.name == "present.1.value").producer()
    concat.outputs[0].name = "present.1.value.concat"  # block 1's values reach the attention from a Concat that is no output
    identity = ir.node("Identity", [concat.outputs[0]])
    identity.outputs[0].name = "present.1.value"
    model.graph.append(identity)
    model.graph.outputs[list(model.graph.outputs).index(concat.outputs[0])] = identity.outputs[0]
    _refused_unchanged(QuantizeKVCache(4), model, r"block 1: its keys and values do not both enter a KV cache")


def test_kv_cache_quantization_refuses_a_model_without_cache_outputs():
    _refused_unchanged(QuantizeKVCache(8), single_matmul_model(), r"not a supported decoder-only LLM graph")


def test_kv_cache_quantization_of_a_valid_cache(tiny_export):
    model = _tiny(tiny_export)
    kv = QuantizeKVCache(8)
    kv.requires(model)
    (request,) = kv.calibration_request(model)  # 8 bits: no queries to tap, no key transform
    assert len(request.taps) == 4  # 2 blocks' new keys and values
    kv.calibrated({t.name: TapStats(np.full(32, 0.7, np.float32), np.zeros(32), None, np.zeros(32)) for t in request.taps},
                  None)
    assert kv(model).modified
    assert [n.op_type for n in model.graph].count(custom_ops.STATIC) == 4


# RotateValueOutput

def test_value_rotation_refuses_value_columns_that_are_not_whole_heads(tiny_export):
    model = _tiny(tiny_export)
    v = _block(model, 1).linears[R.V]
    set_tensor(v.weight_input, np.zeros((v.in_features, 40)))  # 40 columns: not whole heads of 16
    _refused_unchanged(RotateValueOutput(), model,
                       r"blocks\.1\.v: 40 value columns / 64 o rows are not whole heads of 16")


def test_value_rotation_refuses_an_unknown_head_size(tiny_export):
    model = _tiny(tiny_export)
    new_values = next(v for v in model.graph.outputs if v.name == "present.1.value").producer().inputs[1]
    new_values.shape = ir.Shape([*new_values.shape[:3], "head_dim"])
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
