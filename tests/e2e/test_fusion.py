"""ORT fusions on SmolLM2-135M: the fused float graph computes what the exported graph computes."""

import json

import numpy as np
import onnx_ir as ir
import pytest

from qcompile.passes import FuseGroupQueryAttention
from qcompile.targets.ort import FuseNormalizations
from tests.conftest import prompt_and_step

pytestmark = pytest.mark.e2e


def test_fused_float_logits_equal_the_exported_graphs(smollm2_export, tmp_path):
    model = ir.load(smollm2_export / "model.onnx")
    context = json.loads((smollm2_export / "config.json").read_text())["max_position_embeddings"]
    assert FuseGroupQueryAttention(context)(model).modified
    assert FuseNormalizations()(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("GroupQueryAttention") == 30 and ops.count("SkipSimplifiedLayerNormalization") == 60
    assert not {"Softmax", "Neg", "ReduceMean"} & set(ops)  # attention, RoPE and RMSNorm are all fused
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")
    del model
    ids = np.random.default_rng(0).integers(100, 20000, size=(1, 41))  # a prompt, a 3-token chunk, a step
    (p1, s1, _), (p0, s0, _) = prompt_and_step(tmp_path / "model.onnx", ids), prompt_and_step(smollm2_export, ids)
    assert np.abs(p1 - p0).max() <= 1e-3
    assert np.abs(s1 - s0).max() <= 1e-3
