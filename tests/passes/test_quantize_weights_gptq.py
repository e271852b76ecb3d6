import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration
from qcompile.algorithms.gptq import quantize_gptq
from qcompile.algorithms.rtn import quantize_rtn
from qcompile.passes import QuantizeWeightsGPTQ
from qcompile.schemes import Algorithm, WeightScheme


def test_gptq_pass_beats_rtn_on_every_layer(tiny_export):
    """Per linear, the calibration-set output error tr(ΔWᵀ H ΔW) of GPTQ is below RTN's (with the Hessians
    GPTQ optimises: plain for most linears, attention-weighted for v)."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    linears = analysis.analyze(model).linears()
    floats = {lin.name: lin.float_weight().astype(np.float64) for lin in linears}
    windows = np.random.default_rng(0).integers(0, 256, size=(8, 64))
    _, hessians, _ = calibration.linear_statistics(model, linears, windows)
    scheme = WeightScheme(bits=4, group_size=32, algorithm=Algorithm.GPTQ, lm_head_bits=4)
    result = QuantizeWeightsGPTQ(scheme, windows)(model)
    assert result.modified
    for lin in analysis.analyze(model).linears():
        dq = lin.weight_input.producer()
        assert dq.op_type == "DequantizeLinear" and dq.attributes.get_int("block_size") == 32
        q = dq.inputs[0].const_value.numpy().astype(np.float64)
        gptq = q * np.repeat(dq.inputs[1].const_value.numpy(), 32, axis=0)[: q.shape[0]]
        rtn = quantize_rtn(floats[lin.name].astype(np.float32), 4, 32, True).dequantize()

        def err(wq):
            d = floats[lin.name] - wq
            return np.trace(d.T @ hessians[lin.name] @ d)

        assert err(gptq) < err(rtn), lin.name
    assert {e["algorithm"] for e in result.layers} == {"gptq"}


def _codes(model: ir.Model) -> dict[str, np.ndarray]:
    return {lin.name: lin.weight_input.producer().inputs[0].const_value.numpy() for lin in analysis.analyze(model).linears()}


def test_sequential_gptq_measures_each_block_on_the_quantized_blocks_before_it(tiny_export):
    """Block 0 sees float inputs in both modes, so its integers equal parallel GPTQ's; block 1's equal GPTQ
    with Hessians measured on the whole model after block 0 was quantized (the slow way, done here by hand)."""
    _, path = tiny_export("llama")
    windows = np.random.default_rng(0).integers(0, 256, size=(8, 64))
    scheme = WeightScheme(bits=4, group_size=32, algorithm=Algorithm.GPTQ, lm_head_bits=None)
    sequential, parallel = ir.load(path), ir.load(path)
    result = QuantizeWeightsGPTQ(scheme, windows, sequential=True)(sequential)
    QuantizeWeightsGPTQ(scheme, windows)(parallel)
    seq, par = _codes(sequential), _codes(parallel)
    assert [e["name"] for e in result.layers if "algorithm" in e] == [n for n in seq if n != "lm_head"]
    block0 = [n for n in seq if n.startswith("blocks.0.")]
    block1 = [n for n in seq if n.startswith("blocks.1.")]
    for name in block0:
        np.testing.assert_array_equal(seq[name], par[name], err_msg=name)

    by_hand = ir.load(path)
    QuantizeWeightsGPTQ(dataclasses.replace(scheme, skip=tuple(block1)), windows)(by_hand)
    block1_linears = [lin for lin in analysis.analyze(by_hand).linears() if lin.name in block1]
    _, hessians, _ = calibration.linear_statistics(by_hand, block1_linears, windows)
    QuantizeWeightsGPTQ(dataclasses.replace(scheme, skip=tuple(block0)), None, hessians=hessians)(by_hand)
    hand = _codes(by_hand)
    for name in block1:
        np.testing.assert_array_equal(hand[name], seq[name], err_msg=name)
    assert any((seq[name] != par[name]).any() for name in block1)  # the mode matters


def test_parallel_gptq_block_by_block_equals_one_whole_model_calibration(tiny_export):
    """Parallel GPTQ holds one block's Hessians at a time (each block run alone on the float hidden state
    of the block before): its integers equal GPTQ's with every Hessian measured in one whole-model run."""
    _, path = tiny_export("llama")
    windows = np.random.default_rng(1).integers(0, 256, size=(6, 64))
    scheme = WeightScheme(bits=4, group_size=32, algorithm=Algorithm.GPTQ, lm_head_bits=4)
    by_block, whole = ir.load(path), ir.load(path)
    QuantizeWeightsGPTQ(scheme, windows)(by_block)
    _, hessians, _ = calibration.linear_statistics(whole, analysis.analyze(whole).linears(), windows)
    QuantizeWeightsGPTQ(scheme, None, hessians=hessians)(whole)
    got, want = _codes(by_block), _codes(whole)
    assert got.keys() == want.keys() and len(got) == 15
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_4bit_lm_head_alone_is_gptq_in_groups_of_32(tiny_export):
    """`names={"lm_head"}` quantizes only the lm_head (the blocks stay float), in groups of 32 whatever the
    body's group, with the Hessian of its input on the float model (walked block by block, it equals one
    whole-model run's); the tied embedding table stays float."""
    _, path = tiny_export("llama")
    windows = np.random.default_rng(2).integers(0, 256, size=(6, 64))
    scheme = WeightScheme(bits=4, group_size=64, algorithm=Algorithm.RTN, lm_head_bits=4)
    model = ir.load(path)
    head = analysis.analyze(model).lm_head
    weight = head.float_weight()
    _, hessians, _ = calibration.linear_statistics(model, [head], windows)
    result = QuantizeWeightsGPTQ(scheme, windows, names={"lm_head"})(model)
    mm = analysis.analyze(model)
    assert all(lin.weight_input.producer() is None for lin in mm.linears() if lin.name != "lm_head")
    dq = mm.lm_head.weight_input.producer()
    assert dq.op_type == "DequantizeLinear" and dq.attributes.get_int("block_size") == 32
    want = quantize_gptq(weight, hessians["lm_head"], 4, 32, True)
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy(), want.q.astype(np.int8))
    assert [e["name"] for e in result.layers if "bits" in e] == ["lm_head"]
    np.testing.assert_array_equal(mm.embedding.inputs[0].const_value.numpy(), weight.T)  # the table stays float
