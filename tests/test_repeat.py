"""Exporting from a few traced layers (`qcompile.repeat`): the graph equals the one traced whole, op for op and
output for output; each layout of layers (a period of two, GPT-2's and Falcon's blocks, MoE) computes what
transformers computes; a graph whose traced layers differ falls back to tracing every layer."""

from __future__ import annotations

import collections
import importlib

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import repeat
from tests.conftest import prompt_and_step, run_logits
from tests.families import tiny_model

torch = pytest.importorskip("torch")
export_mod = importlib.import_module("qcompile.export")


def _export(model, folder, monkeypatch, whole=False):
    """Export `model` into `folder`; returns (model.onnx path, the layer counts traced)."""
    traced = []
    trace = export_mod._trace
    monkeypatch.setattr(export_mod, "_trace", lambda m, shapes: traced.append(len(shapes)) or trace(m, shapes))
    if whole:
        monkeypatch.setattr(repeat, "plan", lambda m: None)
    folder.mkdir()
    path = export_mod.export_model(model, folder)
    monkeypatch.undo()
    return path, traced


def _ops(path):
    return collections.Counter(n.op_type for n in ir.load(path).graph)


def _assert_same_as_whole(model, tmp_path, monkeypatch, traced_layers):
    path, traced = _export(model, tmp_path / "repeated", monkeypatch)
    whole, _ = _export(model, tmp_path / "whole", monkeypatch, whole=True)
    assert traced == [traced_layers]
    assert _ops(path) == _ops(whole)
    ids = np.array([[5, 9, 17, 33, 2, 60, 7]], dtype=np.int64)
    (prompt, step, cache), (prompt_w, step_w, cache_w) = prompt_and_step(path, ids), prompt_and_step(whole, ids)
    np.testing.assert_allclose(prompt, prompt_w, atol=1e-5)
    np.testing.assert_allclose(step, step_w, atol=1e-5)
    assert cache.keys() == cache_w.keys()
    for name in cache:
        np.testing.assert_allclose(cache[name], cache_w[name], atol=1e-5, err_msg=name)


def test_a_repeated_layer_exports_as_traced_whole(tmp_path, monkeypatch):
    _assert_same_as_whole(tiny_model("llama", num_hidden_layers=4), tmp_path, monkeypatch, traced_layers=3)


@pytest.mark.slow
@pytest.mark.parametrize("family, config, traced_layers", [
    ("gemma2", dict(num_hidden_layers=8), 6),  # sliding and global attention alternate: a period of 2
    ("gpt2", dict(num_hidden_layers=5), 3),
    ("falcon", dict(num_hidden_layers=5), 3),
    ("qwen3_moe", dict(num_hidden_layers=5), 3),
])
def test_each_layout_exports_what_transformers_computes(tmp_path, monkeypatch, family, config, traced_layers):
    model = tiny_model(family, **config)
    path, traced = _export(model, tmp_path / "out", monkeypatch)
    assert traced == [traced_layers]
    ids = np.random.default_rng(0).integers(3, 256, size=(1, 16))
    prompt, later, cache = prompt_and_step(path, ids)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(prompt, want[:, :prompt.shape[1]], atol=1e-4, rtol=0)
    np.testing.assert_allclose(later, want[:, prompt.shape[1]:], atol=1e-4, rtol=0)
    assert len(cache) == 2 * model.config.num_hidden_layers


def _plan(family, **config):
    return repeat.plan(export_mod._unloaded_model(tiny_model(family, **config).config))


def test_the_period_comes_from_the_layers_structure():
    assert _plan("llama", num_hidden_layers=30) == repeat.Plan("model.layers", period=1, traced=3, layers=30)
    assert _plan("gemma2", num_hidden_layers=9) == repeat.Plan("model.layers", period=2, traced=7, layers=9)
    assert _plan("smollm3", num_hidden_layers=8, no_rope_layers=[1, 0] * 4).period == 2  # from a per-layer config list
    assert _plan("llama", num_hidden_layers=3) is None  # nothing left to repeat
    assert _plan("gemma3", num_hidden_layers=8) is None  # a period of 6: 3 periods are more than 8 layers
    # one dense layer among MoE layers, or a per-layer attention scale: the layers do not repeat
    assert _plan("qwen3_moe", num_hidden_layers=6, mlp_only_layers=[4]) is None
    assert _plan("gpt2", num_hidden_layers=6, scale_attn_by_inverse_layer_idx=True) is None


def test_traced_layers_that_differ_are_traced_whole(tmp_path, monkeypatch):
    # a per-layer attention scale the structural check is told to miss: the traced layers' constants differ, so
    # the export traces all 5 layers and computes what the model computes
    model = tiny_model("gpt2", num_hidden_layers=5, scale_attn_by_inverse_layer_idx=True)
    monkeypatch.setattr(repeat, "_signature", lambda layer: "alike")
    path, traced = _export(model, tmp_path / "out", monkeypatch)
    assert traced == [3, 5]
    ids = np.array([[5, 9, 17, 33]], dtype=np.int64)
    want = model(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(run_logits(path, ids), want, atol=1e-4)
