"""QuaRot on SmolLM2-135M: all rotations together leave the float model's logits and generations unchanged."""

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import evaluation, generation, runtime
from qcompile.passes import FuseNormGains, InsertOnlineHadamard, RotateResidualStream, RotateValueOutput
from tests.conftest import run_logits
from tests.e2e.conftest import perplexity

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


@pytest.fixture(scope="module")
def compiled(smollm2_export, tmp_path_factory):
    import qcompile

    root = tmp_path_factory.mktemp("quarot")
    model = smollm2_export / "model.onnx"
    w4a4 = dict(algo="rtn", activations="int4-dynamic", activation_clip=0.9, accuracy_level=0)

    def ppl(target, folder, **kw):
        art = qcompile.compile(model, target, root / folder, eval_windows=None, **{"calib_samples": 8, **kw})
        return perplexity(art.path)

    return {
        "ort-int4": ppl("ort-int4", "ort-int4", algo="rtn", lm_head_bits=8, embedding_bits=None, positive_scales=False),
        "ort-w4a8": ppl("ort-w4a8", "ort-w4a8"),
        "w4a4-rotated": ppl("ort-w4a8", "w4a4-rotated", **w4a4),  # smoothed: the default for int4 activations
        "w4a4-residual": ppl("ort-w4a8", "w4a4-residual", rotation="residual", **w4a4),
        "w4a4-unrotated": ppl("ort-w4a8", "w4a4-unrotated", rotate=False, **w4a4),
    }


def test_ort_w4a8_rotated_gptq_beats_rtn(compiled):
    assert compiled["ort-w4a8"] <= compiled["ort-int4"], compiled


def test_rotation_is_what_makes_4bit_activations_work(compiled):
    assert compiled["w4a4-unrotated"] > 10 * compiled["w4a4-rotated"], compiled


def test_smoothed_norm_rotation_beats_the_residual_rotation_for_4bit_activations(compiled):
    assert compiled["w4a4-rotated"] < compiled["w4a4-residual"], compiled
