"""The streaming export: the graph is traced without weights and each initializer is read from the checkpoint
as it is written. Its readers give transformers' own tensors exactly, every weight is read once, and the export
gives the same logits as exporting the model transformers loads."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from qcompile import errors, sources, weights
from qcompile.export import export_model, export_source, load_hf
from tests.conftest import run_logits, tiny_hf_model, write_byte_tokenizer

torch = pytest.importorskip("torch")
export_mod = importlib.import_module("qcompile.export")  # the package's `export` is the function


def _saved(tmp_path, dtype=None, **save_options):
    """A tiny tied Llama saved as a HF folder (in `dtype` if given); returns the folder."""
    model = tiny_hf_model("llama")
    if dtype is not None:
        model = model.to(dtype)
    folder = tmp_path / "hf"
    model.save_pretrained(folder, **save_options)
    write_byte_tokenizer(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_safetensors_reader_gives_transformers_tensors_exactly(tmp_path, dtype):
    folder = _saved(tmp_path, dtype, max_shard_size="20KB")  # several shards and an index
    assert len(list(folder.glob("*.safetensors"))) > 1
    loaded, _ = load_hf(sources.resolve(folder))
    reader = weights.SafetensorsWeights(folder)
    for name, param in loaded.state_dict().items():
        if name in reader.shapes():
            np.testing.assert_array_equal(reader.read(name), param.numpy(), err_msg=name)
            if param.ndim == 2:
                np.testing.assert_array_equal(reader.read(name, (1, 0)), param.numpy().T, err_msg=name)


def test_streaming_export_equals_in_memory_export_and_reads_each_weight_once(tmp_path, monkeypatch):
    folder = _saved(tmp_path, torch.bfloat16, max_shard_size="20KB")
    monkeypatch.setattr(export_mod, "DEDUP_LIMIT", 1000)  # the tiny model's matrices (>= 2048 values) count as big
    reads = []
    read = weights.SafetensorsWeights.read
    monkeypatch.setattr(weights.SafetensorsWeights, "read", lambda self, name, perm=None: reads.append(name) or read(self, name, perm))
    (tmp_path / "streamed").mkdir()
    streamed = export_source(sources.resolve(folder), tmp_path / "streamed")
    # each big checkpoint tensor is read once, when it is written (the tied embedding once although two nodes read
    # it); small ones (norm gains) are also read to find equal twins
    shapes = weights.SafetensorsWeights(folder).shapes()
    big = [name for name in reads if math.prod(shapes[name]) > 1000]
    assert sorted(big) == sorted(set(big)) and len(big) == 15  # 2 layers x 7 linears + the embedding
    assert set(reads) == set(shapes)

    loaded, _ = load_hf(sources.resolve(folder))
    (tmp_path / "in-memory").mkdir()
    in_memory = export_model(loaded, tmp_path / "in-memory")
    ids = np.random.default_rng(0).integers(3, 256, size=(2, 12))
    np.testing.assert_allclose(run_logits(streamed, ids), run_logits(in_memory, ids), atol=1e-5, rtol=0)
    with torch.no_grad():
        want = loaded(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(run_logits(streamed, ids), want, atol=1e-4, rtol=0)


def test_pickled_checkpoint_is_loaded_whole_and_exports_the_same(tmp_path):
    folder = _saved(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(tiny_hf_model("llama").state_dict(), folder / "pytorch_model.bin")  # the streaming readers skip it
    (tmp_path / "out").mkdir()
    path = export_source(sources.resolve(folder), tmp_path / "out")
    loaded, _ = load_hf(sources.resolve(folder))
    ids = np.random.default_rng(1).integers(3, 256, size=(1, 9))
    with torch.no_grad():
        want = loaded(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(run_logits(path, ids), want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_gguf_reader_gives_transformers_tensors_exactly():
    """SmolLM2's GGUF, dequantized tensor by tensor (q/k un-permuted as transformers does)."""
    source = sources.resolve("smollm2-135m")
    loaded, _ = load_hf(source)
    reader = weights.GGUFWeights(source.path, loaded)
    shapes = reader.shapes()
    checked = 0
    for name, param in loaded.state_dict().items():
        if name in shapes:
            assert shapes[name] == tuple(param.shape), name
            np.testing.assert_array_equal(reader.read(name), param.numpy(), err_msg=name)
            checked += 1
    assert checked == len(shapes) > 200


@pytest.mark.parametrize("damage, message", [(lambda data: data[:len(data) // 2], "is truncated"),
                                             (lambda data: b"\xff" * 16, "not a readable safetensors file")])
def test_a_damaged_safetensors_shard_is_named_before_any_work(tmp_path, damage, message):
    folder = _saved(tmp_path)
    shard = folder / "model.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(errors.CorruptModelError, match=message):
        export_source(sources.resolve(folder), tmp_path)
