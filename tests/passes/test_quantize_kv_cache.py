import numpy as np
import onnx_ir as ir
import pytest

from qcompile.passes import QuantizeKVCache
from qcompile.runtime import Decoder
from tests.test_custom_ops import quantize_asymmetric_rows


def _prefill(path, ids):
    decoder = Decoder(path)
    logits, cache = decoder.forward(ids, decoder.empty_cache(len(ids)), 0)
    return logits, cache


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_cache_holds_per_token_per_head_quantized_values(tiny_export, tmp_path, bits):
    _, path = tiny_export("llama")
    model = ir.load(path)
    QuantizeKVCache(bits)(model)
    assert sum(n.op_type == "QuantizeDequantizeAsymmetric" for n in model.graph) == 2 * 2  # keys and values, 2 layers
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 12))
    float_logits, float_cache = _prefill(path, ids)
    logits, cache = _prefill(tmp_path / "model.onnx", ids)
    # layer 0's keys and values are computed before any quantized cache is read: exactly the float ones, quantized
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        np.testing.assert_allclose(cache[name], quantize_asymmetric_rows(float_cache[name], bits), atol=1e-5)
    error = np.abs(logits - float_logits).max()
    assert 0 < error < (0.5 if bits == 4 else 0.05), error
