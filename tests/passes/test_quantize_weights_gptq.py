import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration
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
    _, hessians = calibration.linear_statistics(model, linears, windows)
    scheme = WeightScheme(bits=4, group_size=32, algorithm=Algorithm.GPTQ, lm_head_bits=4)
    p = QuantizeWeightsGPTQ(scheme, windows)
    assert p(model).modified
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
    assert {e["algorithm"] for e in p.layers} == {"gptq"}
