"""SmoothQuant folding, activation quantizers and their lowerings, on the tiny exported model."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, calibration
from qcompile.algorithms.smoothquant import fake_quantize
from qcompile.passes import FoldSmoothQuantScales, QuantizeActivations, QuantizeWeightsRTN
from qcompile.schemes import ActivationKind as A, ActivationScheme, WeightScheme
from qcompile.targets.trt import check_tensorrt
from tests.conftest import run_logits

W8 = WeightScheme(bits=8, group_size=0, lm_head_bits=8, positive_scales=True)


def _taps(model, scheme=W8):
    from qcompile.passes._canonical import bits_for

    return list(dict.fromkeys(lin.node.inputs[0] for lin in analysis.analyze(model).linears() if bits_for(scheme, lin)))


def _calibrated(tiny_export, rows=0):
    _, path = tiny_export("llama")
    model = ir.load(path)
    windows = np.random.default_rng(0).integers(0, 256, size=(6, 32))
    stats = calibration.collect(model, _taps(model), windows, hessian=False, rows_per_window=rows)
    return path, model, windows, stats


def _save(model, folder, name="model"):
    ir.save(model, folder / f"{name}.onnx", external_data=f"{name}.onnx.data")
    return folder / f"{name}.onnx"


@pytest.mark.parametrize("alpha,up_down", [(0.5, False), (0.8, True), (None, True)])
def test_smoothing_leaves_logits_unchanged_and_stats_exact(tiny_export, tmp_path, alpha, up_down):
    path, model, windows, stats = _calibrated(tiny_export, rows=4)
    norms = {id(b.input_norm.gain): b.input_norm.gain.const_value.numpy().copy() for b in analysis.analyze(model).blocks}
    quantize_weight = lambda w: fake_quantize(w, A.INT8_DYNAMIC)  # noqa: E731  any weight quantizer will do
    fold = FoldSmoothQuantScales(ActivationScheme(A.INT8_STATIC, True, alpha, smooth_up_down=up_down), stats, quantize_weight)
    result = fold(model)
    assert result.modified
    assert len(result.record["alphas"]) == 2 * (3 if up_down else 2)
    mm = analysis.analyze(model)
    assert all(not np.array_equal(norms[id(b.input_norm.gain)], b.input_norm.gain.const_value.numpy()) for b in mm.blocks)
    smoothed = _save(model, tmp_path)
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 16))
    np.testing.assert_allclose(run_logits(smoothed, ids), run_logits(path, ids), atol=1e-4, rtol=0)
    # the pass rescaled the stats exactly as the smoothed model's own activations
    again = calibration.collect(ir.load(smoothed), _taps(ir.load(smoothed)), windows, hessian=False)
    for name, st in again.items():
        np.testing.assert_allclose(stats[name].absmax, st.absmax, rtol=1e-4)


def test_layernorm_gain_and_bias_are_scaled():
    from qcompile.passes._fold import scale_norm

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    gamma, beta = (ir.Value(name=n, const_value=ir.tensor(np.array(v, np.float32), name=n))
                   for n, v in (("gamma", [1.0, 2.0, 0.5, 1.5]), ("beta", [0.1, -0.2, 0.3, 0.0])))
    node = ir.node("LayerNormalization", [x, gamma, beta], attributes={"axis": -1})
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], initializers=[gamma, beta], opset_imports={"": 21}),
                     ir_version=10)
    import onnxruntime as ort

    data = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    before = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": data})[0]
    f = np.array([2.0, 0.5, 4.0, 1.0], np.float32)
    scale_norm(analysis.Norm("layer", node, x, node.outputs[0], gamma), f)
    after = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": data})[0]
    np.testing.assert_allclose(after, before * f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", [A.INT8_STATIC, A.FP8_STATIC, A.INT8_DYNAMIC])
def test_activation_quantizers_compute_the_reference(tiny_export, kind):
    _, model, windows, stats = _calibrated(tiny_export)
    QuantizeWeightsRTN(dataclasses.replace(W8, fp8=kind == A.FP8_STATIC))(model)
    taps = _taps(model)
    result = QuantizeActivations(kind, stats)(model)
    assert result.modified
    quantizers = [n for n in model.graph if n.op_type in ("QuantizeLinear", "QuantizeDequantizePerToken")]
    assert len(quantizers) == len(taps) == 2 * 4 + 1  # q/k/v share one, gate/up one, o, down; lm_head
    linears = analysis.analyze(model).linears()  # still recognised
    assert all(lin.node.inputs[0].name == f"{lin.node.inputs[0].name.removesuffix('_act')}_act" for lin in linears)
    # every linear's input is the numpy reference quantizer applied to the tensor it read before
    by_name = {v.name: v for n in model.graph for v in n.outputs}
    pairs = [(t, by_name[f"{t.name}_act"]) for t in taps]
    got = calibration.collect(model, [v for pair in pairs for v in pair], windows[:1], hessian=False, rows_per_window=32)
    for x, y in pairs:
        np.testing.assert_allclose(got[y.name].samples, fake_quantize(got[x.name].samples, kind, _static_scale(model, y)),
                                   rtol=1e-6, atol=1e-7)
    if kind == A.INT8_DYNAMIC:
        assert ("qcompile", "QuantizeDequantizePerToken", "") in model.functions
    else:
        assert check_tensorrt(model) == []  # the TensorRT W8A8 / FP8 form


def _static_scale(model: ir.Model, quantized: ir.Value) -> float | None:
    """The static scale of the activation quantizer whose output is `quantized` (None for a dynamic one)."""
    node = quantized.producer()
    if node.op_type != "DequantizeLinear":
        return None
    return float(node.inputs[1].const_value.numpy())


def test_a_group_whose_inputs_all_stay_float_is_not_smoothed(tiny_export):
    """Smoothing moves an activation's range into the weights; where no reader's input is quantized it would only
    cost the weights. A group of float inputs keeps its weights; a group with one quantized input is smoothed."""
    _, model, _, stats = _calibrated(tiny_export, rows=0)
    before = {lin.name: lin.float_weight().copy() for lin in analysis.analyze(model).linears()}
    scheme = ActivationScheme(A.INT8_STATIC, True, 0.5, smooth_up_down=True,
                              float_inputs=("blocks.0.*", "blocks.1.q"))  # a pattern and a name
    result = FoldSmoothQuantScales(scheme, stats)(model)
    after = {lin.name: lin.float_weight() for lin in analysis.analyze(model).linears()}
    assert not any(n.startswith("blocks.0.") for n in result.record["alphas"]) and "blocks.1.q" in result.record["alphas"]
    assert all(np.array_equal(before[n], after[n]) for n in ("blocks.0.q", "blocks.0.k", "blocks.0.v"))
    assert not np.array_equal(before["blocks.1.k"], after["blocks.1.k"])
