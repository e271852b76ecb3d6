import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile import analysis, errors, fidelity, runtime
from qcompile.passes import QuantizeWeightsRTN
from qcompile.schemes import WeightScheme
from qcompile.passes import _canonical
from qcompile.targets import get, ort as ort_target, trt as trt_target
from qcompile.targets.trt import PadPartialBlocks, check_tensorrt
from tests.conftest import run_logits
from tests.conftest import single_matmul_model

FP32 = {"session.qdq_matmulnbits_accuracy_level": 0}  # ORT's own DQ→MatMul fusion, pinned to fp32 compute


def _quantized_tiny(tiny_export, **scheme):
    _, path = tiny_export("llama")
    model = ir.load(path)
    QuantizeWeightsRTN(WeightScheme(positive_scales=True, **scheme))(model)
    return model


def _one_linear(k, n, bits, symmetric, block, positive=True):
    """x [M, K] @ DequantizeLinear(RTN weight): one canonical linear named 'lin'."""
    from qcompile.algorithms.rtn import quantize_rtn
    from qcompile.analysis import Linear, Role
    from qcompile.passes._canonical import attach_quantized_weight

    model = single_matmul_model(k, n)
    w = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    node = next(iter(model.graph))
    attach_quantized_weight(model.graph, Linear("lin", Role.Q, 0, node, k, n),
                            quantize_rtn(w, bits, block, symmetric, positive=positive))
    return model, None


def test_padding_to_whole_blocks_keeps_logits_and_integers(tiny_export, tmp_path):
    # hidden 64 and intermediate 128 with blocks of 128: every K=64 linear has a short (partial) block
    model = _quantized_tiny(tiny_export, group_size=128, lm_head_bits=8)
    before = fidelity.digests(model, get("trt-int4"))
    assert check_tensorrt(model) and all("whole number of blocks" in v.rule for v in check_tensorrt(model))
    ir.save(model, tmp_path / "canonical.onnx", external_data="canonical.onnx.data")
    assert PadPartialBlocks()(model).modified
    assert check_tensorrt(model) == []
    assert fidelity.digests(model, get("trt-int4")) == before  # the real rows' integers and scales are untouched
    pads = [n for n in model.graph if n.op_type == "Pad"]
    # per block: one for q/k/v (one shared input), one for o, one for gate/up (down has K=128); plus lm_head
    assert len(pads) == 2 * 3 + 1
    ir.save(model, tmp_path / "padded.onnx", external_data="padded.onnx.data")
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 9))
    np.testing.assert_allclose(run_logits(tmp_path / "padded.onnx", ids, **FP32),
                               run_logits(tmp_path / "canonical.onnx", ids, **FP32), atol=1e-5, rtol=0)


def _violations(model):
    return [v.rule for v in check_tensorrt(model)]


def test_checker_accepts_the_trt_form_and_names_each_broken_rule():
    model, _ = _one_linear(128, 8, 4, True, 64)
    assert _violations(model) == []

    asym, _ = _one_linear(128, 8, 4, False, 64)
    rules = _violations(asym)
    assert any("non-zero zero point" in r for r in rules) and any("UINT4" in r for r in rules)

    signed, _ = _one_linear(128, 8, 4, True, 64, positive=False)  # ONNX Runtime's convention
    assert any("not strictly positive" in r for r in _violations(signed))

    partial, _ = _one_linear(96, 8, 4, True, 64)
    assert any("whole number of blocks" in r for r in _violations(partial))

    old, _ = _one_linear(128, 8, 4, True, 64)
    old.opset_imports[""] = 20
    assert any("opset 20" in r for r in _violations(old))


def test_checker_flags_custom_ops_without_plugin():
    from qcompile.targets.ort import LowerToMatMulNBits

    model, _ = _one_linear(128, 8, 4, True, 64)
    LowerToMatMulNBits()(model)
    rules = _violations(model)
    assert any("com.microsoft.MatMulNBits has no TensorRT plugin" in r for r in rules)


@pytest.mark.parametrize("bits,symmetric,block", [(4, True, 32), (4, False, 64), (8, True, 16), (8, False, 32)])
def test_matmul_nbits_decodes_to_the_canonical_integers(bits, symmetric, block):
    from qcompile.analysis import Linear, Role
    from qcompile.targets.ort import LowerToMatMulNBits

    model, _ = _one_linear(200, 12, bits, symmetric, block, positive=False)
    node = next(n for n in model.graph if n.op_type == "MatMul")
    canonical = _canonical.read_weight(Linear("lin", Role.Q, 0, node, 200, 12))
    LowerToMatMulNBits()(model)
    node = next(iter(model.graph))
    lowered = ort_target.read_weight(Linear("lin", Role.Q, 0, node, 200, 12))
    assert lowered.digest() == canonical.digest()
    np.testing.assert_array_equal(lowered.q, canonical.q)


def test_padded_weight_reads_back_without_its_zero_rows():
    from qcompile.analysis import Linear, Role

    model, _ = _one_linear(96, 8, 4, True, 64)  # K=96: half a block of padding
    linear = lambda: Linear("lin", Role.Q, 0, next(n for n in model.graph if n.op_type == "MatMul"), 96, 8)  # noqa: E731
    canonical = _canonical.read_weight(linear())
    assert PadPartialBlocks()(model).modified
    assert trt_target.read_weight(linear()).digest() == canonical.digest()
    assert _canonical.read_weight(linear()).q.shape == (128, 8)  # only the target that padded knows the rows are padding

    q = next(n for n in model.graph if n.op_type == "DequantizeLinear").inputs[0]
    array = q.const_value.numpy().copy()
    array[-1, 0] = 1
    q.const_value = ir.tensor(array, name=q.name)
    with pytest.raises(errors.InputError, match="padded rows of lin.weight_q are not zero"):
        trt_target.read_weight(linear())


def test_trt_target_refuses_asymmetric_weights(tiny_export, tmp_path):
    _, path = tiny_export("llama")
    for option in (dict(symmetric=False), dict(positive_scales=False)):
        with pytest.raises(errors.InputError, match="symmetric weights with positive scales"):
            qcompile.compile(path, "trt-int4", tmp_path / "out", eval_windows=None, **option)
    assert not (tmp_path / "out").exists()


def test_verify_passes_across_targets_and_names_a_tampered_tensor(tiny_export, tmp_path):
    _, path = tiny_export("llama")
    trt = qcompile.compile(path, "trt-int4", tmp_path / "trt", eval_windows=None, algo="rtn")
    ort = qcompile.compile(path, "ort-int4", tmp_path / "ort", eval_windows=None, algo="rtn")  # the same canonical defaults
    assert trt.manifest["fidelity"]["runtime_rules"] == "TensorRT's explicit-quantization rules: passed"
    report = fidelity.verify(trt.path, against=ort.path)
    assert report["passed"], report["problems"]
    assert report["layers"] == 2 * 7 + 2 and report["logits"]["argmax_agreement"] >= 0.95  # the embedding too

    # ORT's signed scales are a different set of integers, and verify says so
    signed = qcompile.compile(path, "ort-int4", tmp_path / "signed", eval_windows=None, algo="rtn", positive_scales=False)
    report = fidelity.verify(trt.path, against=signed.path)
    assert not report["passed"] and "integers or scales differ" in report["problems"][0]

    # flip one stored 4-bit value of blocks.1.up in the ORT artifact's external data
    model = ir.load(ort.model_path)
    up = next(view for linear in analysis.analyze(model, ort_target.FORMS).linears() for view in linear.views()
              if view.name == "blocks.1.up")
    tensor = ort_target.read_weight(up).tensor
    value = model.graph.initializers[tensor]
    array = value.const_value.numpy().copy()
    array[up.columns[0] if up.columns else 0].flat[5] ^= 0x01  # in up's rows of B [N, blocks, bytes] (packed after gate's)
    value.const_value = ir.tensor(array, name=tensor)
    ir.save(model, ort.model_path, external_data="model.onnx.data")
    report = fidelity.verify(ort.path)
    assert not report["passed"]
    assert any("blocks.1.up" in p and tensor in p for p in report["problems"]), report["problems"]
    assert len(report["problems"]) == 1


@pytest.mark.parametrize("target", ["trt-int4", "trt-int8"])
def test_artifacts_run_on_the_cpu_as_tensorrt_computes_them(tiny_export, tmp_path, target):
    # TensorRT computes Q/DQ exactly (float activations into a weight-only DequantizeLinear → MatMul). ORT's default
    # session fuses them into its integer kernels: the manifest records the session config that keeps them exact.
    import onnxruntime as ort

    _, path = tiny_export("llama")
    art = qcompile.compile(path, target, tmp_path / "trt", eval_windows=None, algo="rtn")
    assert art.manifest["target"]["cpu_session"]
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 9))
    decoder = runtime.Decoder(art.path)
    got = decoder.forward(ids, decoder.empty_cache(len(ids)), 0)[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every node as written
    plain = ort.InferenceSession(str(art.model_path), options, providers=["CPUExecutionProvider"])
    ref = plain.run(["logits"], decoder.feeds(ids, decoder.empty_cache(len(ids)), 0))[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    if target == "trt-int4":  # ORT's default: MatMulNBits at accuracy_level 4 rounds the activations to int8
        assert np.abs(run_logits(art.path, ids) - ref).max() > 1e-3


@pytest.mark.parametrize("rotate", [False, True])  # rotated: TensorRT parses the qcompile.Hadamard function op
def test_engine_builds_into_the_artifact(tiny_export, tmp_path, rotate):
    pytest.importorskip("tensorrt_rtx", reason="CI installs qcompile[tensorrt-rtx]")
    from qcompile import engine
    from qcompile.artifact import Artifact

    _, path = tiny_export("llama")
    art = qcompile.compile(path, "trt-int4", tmp_path / "trt", eval_windows=None, rotate=rotate)
    assert any(n.op_type == "Hadamard" for n in ir.load(art.path / "model.onnx").graph) == rotate
    record = engine.build(art.path, engine.Profiles(max_prompt=64, max_length=128, opt_prompt=16, opt_length=32))
    file = art.path / engine.ENGINE_FILE
    assert file.stat().st_size == record["bytes"] > 0
    manifest = Artifact.load(art.path).manifest
    assert manifest["engine"] == record and manifest["files"][engine.ENGINE_FILE]["sha256"] == record["sha256"]
    # deserialising needs a CUDA device: True where one is, else the reason it was not checked
    assert record["deserialized"] is True or record["deserialized"].startswith("not checked")

    ort = qcompile.compile(path, "ort-int4", tmp_path / "ort", eval_windows=None)
    with pytest.raises(errors.InputError, match="not a TensorRT artifact"):
        engine.build(ort.path)
