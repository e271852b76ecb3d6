"""Resumable GPTQ: an interrupted compile continued from its saved state writes the same bytes."""

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, errors
from qcompile.checkpoint import Checkpoint, state_folder
from qcompile.passes import QuantizeWeightsGPTQ, quantize_weights_gptq
from qcompile.schemes import Algorithm, WeightScheme

SCHEME = WeightScheme(bits=4, group_size=32, algorithm=Algorithm.GPTQ, lm_head_bits=4)
WINDOWS = np.random.default_rng(0).integers(0, 256, size=(6, 48))
FINGERPRINT = {"source": "tiny", "weights": SCHEME.to_dict()}


def _compile(path, out, sequential, checkpoint=None):
    model = ir.load(path)
    QuantizeWeightsGPTQ(SCHEME, WINDOWS, sequential=sequential, checkpoint=checkpoint)(model)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    return (out / "model.onnx").read_bytes() + (out / "model.onnx.data").read_bytes()


@pytest.mark.parametrize("sequential", [False, True])
def test_interrupted_gptq_resumes_to_a_byte_identical_model(tiny_export, tmp_path, monkeypatch, sequential):
    _, path = tiny_export("llama")
    (tmp_path / "plain").mkdir()
    (tmp_path / "resumed").mkdir()
    plain = _compile(path, tmp_path / "plain", sequential)

    out = tmp_path / "artifact"
    real, calls = quantize_weights_gptq.quantize_gptq, []

    def interrupted_after_8(*args, **kwargs):  # a Ctrl-C in the middle of block 1
        if len(calls) == 8:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize_weights_gptq, "quantize_gptq", interrupted_after_8)
    with pytest.raises(KeyboardInterrupt):
        _compile(path, tmp_path / "resumed", sequential, Checkpoint(out, FINGERPRINT, resume=False))
    monkeypatch.setattr(quantize_weights_gptq, "quantize_gptq", real)
    state = Checkpoint(out, FINGERPRINT, resume=True)
    assert sum(state.load_weight(linear.name) is not None for linear in analysis.analyze(ir.load(path)).linears()) == 8
    if sequential:
        assert state.load_hidden()[0] == 1  # block 0 finished and propagated; block 1 half done

    recomputed = []
    monkeypatch.setattr(quantize_weights_gptq, "quantize_gptq", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    resumed = _compile(path, tmp_path / "resumed", sequential, state)
    assert len(recomputed) == 15 - 8  # 2 blocks × 7 linears + lm_head, 8 of them restored
    assert resumed == plain


def test_resume_refuses_missing_or_different_state(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(errors.InputError, match="nothing to resume"):
        Checkpoint(out, FINGERPRINT, resume=True)
    Checkpoint(out, FINGERPRINT, resume=False)
    assert state_folder(out).is_dir() and not out.exists()
    with pytest.raises(errors.InputError, match="other settings"):
        Checkpoint(out, {**FINGERPRINT, "source": "another"}, resume=True)
    Checkpoint(out, FINGERPRINT, resume=True)  # same settings: accepted
