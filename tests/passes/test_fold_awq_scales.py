import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration
from qcompile.passes import FoldAWQScales
from qcompile.schemes import WeightScheme
from tests.conftest import run_logits


def test_folding_awq_scales_leaves_logits_unchanged(tiny_export, tmp_path):
    _, path = tiny_export("llama")
    model = ir.load(path)
    before = {lin.name: lin.float_weight().copy() for lin in analysis.analyze(model).linears()}
    windows = np.random.default_rng(0).integers(0, 256, size=(8, 64))
    stats, hessians, _ = calibration.linear_statistics(model, analysis.analyze(model).linears(), windows)
    result = FoldAWQScales(WeightScheme(group_size=32), stats, hessians)(model)
    assert result.modified
    assert max(result.record["alphas"].values()) > 0  # some group really was rescaled
    after = {lin.name: lin.float_weight() for lin in analysis.analyze(model).linears()}
    assert max(np.abs(after[n] - before[n]).max() for n in before if n != "lm_head") > 1e-3
    np.testing.assert_array_equal(after["lm_head"], before["lm_head"])  # tied to the embedding: untouched
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 16))
    np.testing.assert_allclose(run_logits(tmp_path / "model.onnx", ids), run_logits(path, ids), atol=1e-4, rtol=0)
