"""QuaRot on SmolLM2-135M: all rotations together leave the float model's logits and generations unchanged."""

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import evaluation, generation, runtime
from qcompile.passes import FuseNormGains, InsertOnlineHadamard, RotateResidualStream, RotateValueOutput
from tests.conftest import run_logits

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rotated(smollm2_export, tmp_path_factory):
    model = ir.load(smollm2_export / "model.onnx")
    for rotation in (FuseNormGains(), RotateResidualStream(seed=0), RotateValueOutput(seed=0), InsertOnlineHadamard()):
        rotation(model)
    out = tmp_path_factory.mktemp("rotated")
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    for name in ("tokenizer.json", "config.json"):
        (out / name).write_bytes((smollm2_export / name).read_bytes())
    return out


def test_rotated_float_logits_equal_the_original(smollm2_export, rotated):
    ids = evaluation.windows(runtime.load_tokenizer(smollm2_export), 1)[:, :256]
    got, ref = run_logits(rotated / "model.onnx", ids), run_logits(smollm2_export / "model.onnx", ids)
    assert np.abs(got - ref).max() <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() == 1.0


def test_rotated_greedy_generation_is_identical(smollm2_export, rotated):
    ids = runtime.load_tokenizer(smollm2_export).encode("The capital of France is").ids
    greedy = [list(generation.generate(runtime.Decoder(folder), ids, 32)) for folder in (rotated, smollm2_export)]
    assert greedy[0] == greedy[1]
