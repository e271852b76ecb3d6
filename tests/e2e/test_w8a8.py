"""SmoothQuant W8A8 on SmolLM2-135M: the fold is float-equivalent, and it is what makes W8A8 work."""

import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile import analysis, calibration, evaluation, fidelity, runtime
from qcompile.passes import FoldSmoothQuantScales
from qcompile.schemes import ActivationKind, ActivationScheme
from qcompile.targets import trt
from qcompile.targets.trt import check_tensorrt
from tests.conftest import run_logits
from tests.e2e.conftest import increase_pct

pytestmark = pytest.mark.e2e
CALIB = 8


def test_smoothquant_folding_is_float_equivalent(smollm2_export, tmp_path):
    tokenizer = runtime.load_tokenizer(smollm2_export)
    model = ir.load(smollm2_export / "model.onnx")
    taps = list(dict.fromkeys(lin.node.inputs[0] for lin in analysis.analyze(model).linears()))
    stats = calibration.collect(model, taps, calibration.calibration_windows(tokenizer, samples=2), hessian=False)
    fold = FoldSmoothQuantScales(ActivationScheme(ActivationKind.INT8_STATIC, True, 0.8, smooth_up_down=True), stats)
    assert len(fold(model).record["alphas"]) == 30 * 3
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")
    ids = evaluation.windows(tokenizer, 1)[:, :128]
    got, ref = run_logits(tmp_path / "model.onnx", ids), run_logits(smollm2_export / "model.onnx", ids)
    assert np.abs(got - ref).max() <= 1e-3


@pytest.fixture(scope="module")
def w8a8(smollm2_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    model = smollm2_export / "model.onnx"
    compile_ = lambda name, target, **kw: qcompile.compile(  # noqa: E731
        model, target, root / name, calib_samples=CALIB, eval_windows=None, **kw)
    return {
        "trt-int8": compile_("trt-int8", "trt-int8"),
        "trt-int8-plain": compile_("trt-int8-plain", "trt-int8", smoothquant=False),
        "ort-w8a8": compile_("ort-w8a8", "ort-w8a8"),
        "trt-fp8": compile_("trt-fp8", "trt-fp8"),
    }


@pytest.fixture(scope="module")
def increase(w8a8, float_ppl) -> dict[str, float]:
    """Each artifact's perplexity increase over float, percent."""
    return {name: increase_pct(art.path, float_ppl) for name, art in w8a8.items()}


def test_static_int8_with_smoothquant_is_close_to_float_and_far_better_without(w8a8, increase):
    smooth, plain = increase["trt-int8"], increase["trt-int8-plain"]
    assert smooth < 1.0, smooth
    assert plain > smooth + 4.0, (plain, smooth)
    manifest = w8a8["trt-int8"].manifest
    passes = {p["name"]: p for p in manifest["passes"]}
    assert manifest["recipe"]["activations"]["kind"] == "int8-static"
    # per block q/k/v's input, o's and gate/up's; lm_head and the down projections keep float inputs
    assert passes["QuantizeActivations"]["static_scales"]["count"] == 30 * 3
    assert "FoldSmoothQuantScales" in passes and manifest["recipe"]["calibration"]["samples"] == CALIB


def test_dynamic_per_token_and_fp8_quality(increase):
    assert increase["ort-w8a8"] < 4.0
    assert increase["trt-fp8"] < 5.0


def test_tensorrt_forms_pass_the_checker_and_keep_their_integers(w8a8):
    for name in ("trt-int8", "trt-fp8"):
        art = w8a8[name]
        assert art.manifest["fidelity"]["runtime_rules"] == "TensorRT's explicit-quantization rules: passed"
        model = ir.load(art.model_path)
        assert check_tensorrt(model) == []
        assert fidelity.verify(art.path)["passed"]
        decoded = [d for d in map(trt.read_weight, analysis.analyze(model).linears()) if d is not None]
        assert len(decoded) == 30 * 7 + 1 and all(d.block_size == d.q.shape[0] for d in decoded)  # per channel
        assert all(d.fp8 == (name == "trt-fp8") for d in decoded)


def test_ort_w8a8_runs_matmul_nbits_int8(w8a8):
    ops = [n.op_type for n in ir.load(w8a8["ort-w8a8"].model_path).graph]
    assert ops.count("MatMulNBits") == 30 * 4 + 1 and "QuantizeDequantizePerToken" not in ops  # q/k/v, gate/up packed


def test_tensorrt_rtx_builds_the_int8_engine(w8a8):
    pytest.importorskip("tensorrt_rtx", reason="CI installs qcompile[tensorrt-rtx]")
    from qcompile import engine

    record = engine.build(w8a8["trt-int8"].path)
    assert record["bytes"] > 0 and (w8a8["trt-int8"].path / engine.ENGINE_FILE).is_file()
