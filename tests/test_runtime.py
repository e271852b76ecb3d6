import numpy as np
import onnx_ir as ir
import pytest

from qcompile import errors, runtime
from qcompile.passes import FuseGroupQueryAttention


@pytest.fixture(scope="module")
def graphs(tiny_export, tmp_path_factory):
    """(unfused, fused with GroupQueryAttention applying RoPE) tiny Llama decoders."""
    _, path = tiny_export("llama")
    folder = tmp_path_factory.mktemp("runtime")
    model = ir.load(path)
    FuseGroupQueryAttention(256)(model)
    ir.save(model, folder / "fused.onnx", external_data="fused.onnx.data")
    return path, folder / "fused.onnx"


def _forward_loop(decoder, prompt, tokens):
    logits, cache = decoder.forward(np.array([prompt]), decoder.empty_cache(), 0)
    out = [logits[0, -1]]
    for i, token in enumerate(tokens):
        logits, cache = decoder.forward(np.array([[token]]), cache, len(prompt) + i)
        out.append(logits[0, -1])
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_sequence_decodes_as_the_plain_forward_loop(graphs, fused):
    """Fused: the cache is one buffer per layer, bound as past and present, appended in place by GQA."""
    decoder = runtime.Decoder(graphs[fused])
    assert decoder.appends_in_place == fused
    rng = np.random.default_rng(0)
    prompt, tokens = rng.integers(0, 256, size=11).tolist(), rng.integers(0, 256, size=9).tolist()
    want = _forward_loop(decoder, prompt, tokens)
    sequence = decoder.sequence(len(prompt) + len(tokens) + 5)  # spare capacity: the buffer tail is unused
    got = [sequence.prefill(prompt)] + [sequence.step(t) for t in tokens]
    assert len({float(g[0]) for g in got}) > 1  # every step's logits kept, not one reused buffer
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_sequence_beyond_its_capacity_is_a_clear_error(graphs):
    sequence = runtime.Decoder(graphs[1]).sequence(4)
    sequence.prefill([1, 2, 3])
    sequence.step(4)
    with pytest.raises(errors.InputError, match="capacity 4"):
        sequence.step(5)


def test_latency_times_two_prefills_and_its_rounds_continue_one_sequence(graphs):
    from qcompile import evaluation

    decoder = runtime.Decoder(graphs[1])
    capacities, make = [], decoder.sequence
    decoder.sequence = lambda capacity: capacities.append(capacity) or make(capacity)
    record = evaluation.latency(decoder, prompt_len=16, decode_steps=4, rounds=3)
    assert capacities == [17, 16 + 3 * 4]  # a warming prefill, then one sequence for every round's steps
    assert record["prefill_ms"] > 0 and record["decode_ms_per_token"] > 0
    assert (record["prompt_len"], record["decode_steps"]) == (16, 4)
