import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, calibration, errors


def test_tap_statistics_equal_torch_activations(tiny_export):
    """The Hessian, max and mean of q_proj's input equal those of the torch module's input."""
    torch = pytest.importorskip("torch")
    hf, path = tiny_export("llama")
    model = ir.load(path)
    mm = analysis.analyze(model)
    q, down = mm.blocks[1].linears[analysis.Role.Q], mm.blocks[0].linears[analysis.Role.DOWN]
    windows = np.random.default_rng(0).integers(0, 256, size=(3, 24))
    outputs = list(model.graph.outputs)
    stats = calibration.collect(model, [q.node.inputs[0], down.node.inputs[0]], windows)
    assert list(model.graph.outputs) == outputs  # the taps are gone again
    seen = {"q": [], "down": []}
    hooks = [hf.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen["q"].append(a[0])),
             hf.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0]))]
    with torch.no_grad():
        for w in windows:
            hf(torch.from_numpy(w[None]))
    for h in hooks:
        h.remove()
    for key, lin in (("q", q), ("down", down)):
        x = torch.cat(seen[key], dim=1).reshape(-1, lin.in_features).double().numpy()
        s = stats[lin.node.inputs[0].name]
        assert s.tokens == 3 * 24
        np.testing.assert_allclose(s.hessian, x.T @ x, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s.absmax, np.abs(x).max(axis=0), rtol=1e-5)
        np.testing.assert_allclose(s.absmean, np.abs(x).mean(axis=0), rtol=1e-5)



def test_statistics_from_a_fed_hidden_state_equal_the_full_run(tiny_export):
    """Feeding block 1's input (as `values` computed it) and running only block 1 gives the same
    statistics, attention-weighted ones included, as running the whole model: what sequential GPTQ relies on."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    block = analysis.analyze(model).blocks[1]
    taps = list(dict.fromkeys(lin.node.inputs[0] for lin in block.linears.values()))
    v_tap = block.linears[analysis.Role.V].node.inputs[0]
    windows = np.random.default_rng(1).integers(0, 256, size=(3, 24))
    entry = block.input_norm.input
    hidden = calibration.values(model, entry, windows)
    assert hidden.shape == (3, 24, 64)
    request = calibration.Request(taps, hessian=True, attention={v_tap.name: block.attention_probs})
    full, _ = calibration.run(model, [request], windows)
    fed, _ = calibration.run(model, [request], windows, start=(entry, hidden))
    assert set(fed) == set(full) and len(full) == len(taps) + 1
    for key in full:
        np.testing.assert_allclose(fed[key].hessian, full[key].hessian, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(fed[key].absmax, full[key].absmax, rtol=1e-6)
    exit_ = block.output
    np.testing.assert_allclose(calibration.values(model, exit_, windows, start=(entry, hidden)),
                               calibration.values(model, exit_, windows), rtol=1e-5, atol=1e-6)
    assert calibration.START_INPUT not in [v.name for v in model.graph.inputs]  # the model itself is untouched


class _Tokenizer:
    def encode(self, text):
        class Ids:
            ids = list(range(len(text.split())))
        return Ids()


def test_calibration_text_errors(tmp_path):
    (tmp_path / "short.txt").write_text("a few words only")
    with pytest.raises(errors.InputError, match="fewer than one window"):
        calibration.calibration_windows(_Tokenizer(), tmp_path / "short.txt", 1, 512)
    (tmp_path / "some.txt").write_text("word " * 1000)
    with pytest.raises(errors.InputError, match="fewer than --calib-samples 5"):
        calibration.calibration_windows(_Tokenizer(), tmp_path / "some.txt", 5, 512)
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(errors.InputError, match='"text" field'):
        calibration.calibration_windows(_Tokenizer(), tmp_path / "bad.jsonl", 1, 8)
    (tmp_path / "ok.jsonl").write_text('{"text": "' + "w " * 40 + '"}\n')
    assert calibration.calibration_windows(_Tokenizer(), tmp_path / "ok.jsonl", 2, 16).shape == (2, 16)
    with pytest.raises(errors.SourceNotFoundError):
        calibration.calibration_windows(_Tokenizer(), tmp_path / "missing.txt", 1, 8)


def test_attention_weighted_hessian(tiny_export, tmp_path):
    """H_att = Σ_t w_t x_tᵀx_t with w_t = Σ_{h,i} p_hit² / heads, from the block's softmax probabilities."""
    from qcompile.runtime import Decoder

    _, path = tiny_export("llama")
    model = ir.load(path)
    block = analysis.analyze(model).blocks[0]
    assert block.attention_probs is not None and block.attention_probs.producer().op_type == "Softmax"
    tap = block.linears[analysis.Role.V].node.inputs[0]
    windows = np.random.default_rng(0).integers(0, 256, size=(2, 16))
    stats, _ = calibration.run(model, [calibration.Request([tap], hessian=True, attention={tap.name: block.attention_probs})], windows)
    _, hessians, _ = calibration.linear_statistics(model, list(block.linears.values()), windows)
    # the reference: read x and p straight from ORT and weight by hand
    model.graph.outputs.extend([tap, block.attention_probs])
    ir.save(model, tmp_path / "m.onnx", external_data="m.onnx.data")
    decoder = Decoder(tmp_path / "m.onnx")
    expected = 0.0
    for w in windows:
        x, p = decoder.session.run([tap.name, block.attention_probs.name], decoder.feeds(w[None], decoder.empty_cache(), 0))
        weights = (p[0] ** 2).sum(axis=(0, 1)) / p.shape[1]
        x = x[0].astype(np.float64)
        expected = expected + (x * weights[:, None]).T @ x
    weighted = stats[calibration.attention_key(tap.name)].hessian
    np.testing.assert_allclose(weighted, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(hessians["blocks.0.v"], weighted)
    np.testing.assert_array_equal(hessians["blocks.0.q"], stats[tap.name].hessian)


def test_one_run_serves_several_requests_as_separate_runs_would(tiny_export):
    """Requests sharing a tap get one TapStats with the union of what they ask (a Hessian, sampled rows),
    equal to what each would get from a run of its own."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    mm = analysis.analyze(model)
    q, down = mm.blocks[0].linears[analysis.Role.Q], mm.blocks[0].linears[analysis.Role.DOWN]
    windows = np.random.default_rng(2).integers(0, 256, size=(3, 24))
    rows = calibration.Request([q.node.inputs[0]], rows=4)
    hessians = calibration.linear_request(model, [q, down])
    shared, _ = calibration.run(model, [rows, hessians], windows)
    alone_rows, _ = calibration.run(model, [rows], windows)
    alone_hessians, _ = calibration.run(model, [hessians], windows)
    tap = q.node.inputs[0].name
    np.testing.assert_array_equal(shared[tap].samples, alone_rows[tap].samples)
    np.testing.assert_array_equal(shared[tap].hessian, alone_hessians[tap].hessian)
    assert alone_rows[tap].hessian is None and shared[down.node.inputs[0].name].rows == []


def test_windows_from_a_prefix_equal_those_from_the_whole_text(tmp_path):
    """Calibration encodes only a prefix of the text when that gives enough tokens: the same ids as encoding
    all of it (a byte-level BPE tokenizer here; tests/e2e checks SmolLM2's)."""
    from qcompile import evaluation
    from qcompile.runtime import load_tokenizer
    from tests.conftest import write_byte_tokenizer

    write_byte_tokenizer(tmp_path)
    assert_prefix_windows_exact(load_tokenizer(tmp_path), evaluation.wikitext("valid"))


def assert_prefix_windows_exact(tokenizer, text: str) -> None:
    for samples, seqlen in ((4, 64), (32, 512)):
        windows = calibration.calibration_windows(tokenizer, None, samples, seqlen)
        whole = np.array(tokenizer.encode(text).ids[: samples * seqlen]).reshape(samples, seqlen)
        np.testing.assert_array_equal(windows, whole)
