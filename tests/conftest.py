"""Shared fixtures: tiny randomly initialised HF models exported to ONNX (no download), hand-built graphs."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import numpy as np
import onnx_ir as ir
import pytest

from tests.families import write_byte_tokenizer  # noqa: F401  (tests import it from here too)

# The CLI's tables are as wide as the terminal: one width wherever the tests run (pytest-xdist's workers have none).
os.environ["COLUMNS"] = "160"


_OWN_CACHE: list[str] = []  # the cache this process made for the run (removed at its end)


def pytest_configure(config):
    """Set before pytest-xdist's workers start (pyproject's addopts), so that they inherit it: one thread per
    worker (BLAS, torch and ONNX Runtime; two workers' threads competing for the cores made the real-model
    tests 2× slower), and one fresh export cache for the run unless QCOMPILE_CACHE_DIR names one."""
    if getattr(config.option, "numprocesses", None) not in (None, 0, 1):
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "QCOMPILE_THREADS"):
            os.environ.setdefault(name, "1")
    if "QCOMPILE_CACHE_DIR" not in os.environ:
        _OWN_CACHE.append(tempfile.mkdtemp(prefix="qcompile-tests-cache-"))
        os.environ["QCOMPILE_CACHE_DIR"] = _OWN_CACHE[0]


def pytest_collection_modifyitems(items):
    """Each family's tests in test_families.py run on one pytest-xdist worker (`--dist loadgroup`), as each
    real-model module's do (tests/e2e/conftest.py), so a family's export and artifacts stay with its tests."""
    for item in items:
        family = getattr(item, "callspec", None) and item.callspec.params.get("family")
        if item.fspath.basename == "test_families.py" and family:
            item.add_marker(pytest.mark.xdist_group(f"family-{family}"))


def pytest_unconfigure(config):
    for cache in _OWN_CACHE:
        shutil.rmtree(cache, ignore_errors=True)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_hf_model(arch: str, **config):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    config = config_cls(**{**TINY, **config}, tie_word_embeddings=(arch == "llama"))
    model = model_cls(config).eval()
    with torch.no_grad():  # random norm gains, so that folding/ignoring them would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """arch -> (hf model, path of its exported model.onnx, with a byte-level tokenizer.json beside it);
    each arch exported once per session."""
    from qcompile.export import export_model

    cache = {}

    def get(arch: str = "llama"):
        if arch not in cache:
            model = tiny_hf_model(arch)
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            path = export_model(model, folder)
            write_byte_tokenizer(folder)
            cache[arch] = (model, path)
        return cache[arch]

    return get


def run_logits(path: pathlib.Path | str, ids: np.ndarray, **session_config) -> np.ndarray:
    from qcompile.runtime import Decoder

    decoder = Decoder(path, session_config=session_config)
    logits, _ = decoder.forward(ids, decoder.empty_cache(len(ids)), 0)
    return logits


def prompt_and_step(path, ids):
    """A prompt and a decode step (batch 1: a prompt, a 3-token chunk after it, then the step; ORT's GQA
    refuses a multi-token chunk after a cache for batches over 1): their logits and the final cache."""
    from qcompile.runtime import Decoder

    decoder = Decoder(path)
    n = ids.shape[1]
    cuts = [n - 4, n - 1, n] if len(ids) == 1 else [n - 1, n]
    prompt, cache = decoder.forward(ids[:, :cuts[0]], decoder.empty_cache(len(ids)), 0)
    later = []
    for start, stop in zip(cuts, cuts[1:]):
        logits, cache = decoder.forward(ids[:, start:stop], cache, start)
        later.append(logits)
    return prompt, np.concatenate(later, axis=1), cache


def single_matmul_model(k: int = 8, n: int = 4) -> ir.Model:
    """x [1, K] @ W [K, N]: a graph with no transformer in it."""
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((k, n), np.float32), name="w"))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, k]))
    node = ir.node("MatMul", [x, w])
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)
