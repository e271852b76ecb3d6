import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, errors
from qcompile.algorithms.rtn import quantize_rtn
from qcompile.passes import QuantizeWeightsRTN
from qcompile.schemes import WeightScheme
from tests.conftest import run_logits


def _quantized(path, scheme):
    model = ir.load(path)
    floats = {lin.name: lin.float_weight().copy() for lin in analysis.analyze(model).linears()}
    p = QuantizeWeightsRTN(scheme)
    result = p(model)
    return result, p, floats


@pytest.mark.parametrize("symmetric", [True, False])
def test_every_linear_reads_a_blocked_dequantize(tiny_export, symmetric):
    _, path = tiny_export("llama")
    scheme = WeightScheme(bits=4, group_size=32, symmetric=symmetric, lm_head_bits=8)
    result, p, floats = _quantized(path, scheme)
    assert result.modified
    mm = analysis.analyze(result.model)  # the quantized graph is still recognised
    for lin in mm.linears():
        dq = lin.weight_input.producer()
        assert dq.op_type == "DequantizeLinear"
        assert dq.attributes.get_int("axis") == 0 and dq.attributes.get_int("block_size") == 32
        bits = 8 if lin.role == analysis.Role.LM_HEAD else 4
        expected = quantize_rtn(floats[lin.name], bits, 32, symmetric)
        np.testing.assert_array_equal(dq.inputs[0].const_value.numpy().astype(np.int16), expected.q.astype(np.int16))
        np.testing.assert_array_equal(dq.inputs[1].const_value.numpy(), expected.scale)
        assert (len(dq.inputs) == 3) == (not symmetric)
    assert {e["name"] for e in result.layers if "bits" in e} == set(floats)
    # the tied embedding stays (the Gather reads it) but no float linear weight is left
    names = set(result.model.graph.initializers)
    assert not any(lin.weight_input.name in names for lin in mm.linears())


def test_quantized_model_runs_close_to_float(tiny_export, tmp_path):
    _, path = tiny_export("qwen2")  # biases on q/k/v
    result, _, _ = _quantized(path, WeightScheme(bits=8, group_size=32, lm_head_bits=8))
    ir.save(result.model, tmp_path / "model.onnx", external_data="model.onnx.data")
    ids = np.random.default_rng(0).integers(0, 256, size=(1, 16))
    ref, got = run_logits(path, ids), run_logits(tmp_path / "model.onnx", ids)
    snr_db = 10 * np.log10((ref**2).sum() / ((got - ref) ** 2).sum())
    assert snr_db > 30, f"8-bit RTN logits SNR {snr_db:.1f} dB"


def test_skip_list_and_float_lm_head_stay_float(tiny_export):
    _, path = tiny_export("llama")
    result, p, floats = _quantized(path, WeightScheme(lm_head_bits=None, skip=("blocks.0.down",), group_size=32))
    mm = analysis.analyze(result.model)
    kept = {lin.name for lin in mm.linears() if lin.format() == "FLOAT"}
    assert kept == {"lm_head", "blocks.0.down"}
    np.testing.assert_array_equal(mm.lm_head.float_weight(), floats["lm_head"])
    assert mm.tied_lm_head  # the untouched lm_head still reads the embedding


def test_refuses_an_already_quantized_model(tiny_export):
    _, path = tiny_export("llama")
    result, _, _ = _quantized(path, WeightScheme(group_size=32))
    with pytest.raises(errors.InputError, match="already quantized"):
        QuantizeWeightsRTN(WeightScheme(group_size=32))(result.model)
