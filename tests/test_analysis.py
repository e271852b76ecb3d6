import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, errors
from tests.conftest import single_matmul_model

HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_roles_match_the_hf_modules(tiny_export, arch):
    """Every linear the analysis finds holds exactly the weight of the HF module of that role."""
    hf, path = tiny_export(arch)
    mm = analysis.analyze(ir.load(path))
    assert len(mm.blocks) == hf.config.num_hidden_layers
    params = dict(hf.named_parameters())
    for block in mm.blocks:
        R = analysis.Role
        assert set(block.linears) == {R.Q, R.K, R.V, R.O, R.GATE, R.UP, R.DOWN}
        for role, lin in block.linears.items():
            expected = params[f"model.layers.{block.index}.{HF_NAMES[role.value]}.weight"].detach().numpy().T
            np.testing.assert_array_equal(lin.float_weight(), expected, err_msg=lin.name)
        gains = {"input": block.input_norm.gain.const_value.numpy(),
                 "post": block.post_attention_norm.gain.const_value.numpy()}
        np.testing.assert_array_equal(gains["input"], params[f"model.layers.{block.index}.input_layernorm.weight"].detach().numpy())
        np.testing.assert_array_equal(gains["post"], params[f"model.layers.{block.index}.post_attention_layernorm.weight"].detach().numpy())
        assert block.linears[analysis.Role.Q].norm is block.input_norm
        assert block.linears[analysis.Role.UP].norm is block.post_attention_norm
        assert block.linears[analysis.Role.O].norm is None
        assert block.input is not None and block.output is not None
    np.testing.assert_array_equal(mm.lm_head.float_weight(), hf.lm_head.weight.detach().numpy().T)
    np.testing.assert_array_equal(mm.final_norm.gain.const_value.numpy(), hf.model.norm.weight.detach().numpy())
    assert mm.tied_lm_head == hf.config.tie_word_embeddings
    assert mm.hidden_size == hf.config.hidden_size


def test_graph_without_embedding_is_refused_with_reason():
    with pytest.raises(errors.UnsupportedModelError, match="no token-embedding Gather"):
        analysis.analyze(single_matmul_model())


def test_graph_without_blocks_is_refused_with_reason(tiny_export):
    """An embedding → norm → lm_head graph (blocks cut out) names the missing q/k/v."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    mm = analysis.analyze(model)
    # keep only logits, and feed the final norm from the embedding: every block becomes dead code
    while len(model.graph.outputs) > 1:
        model.graph.outputs.pop()
    first = mm.blocks[0].input_norm.input
    last_residual = mm.blocks[-1].output
    last_residual.replace_all_uses_with(first)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    with pytest.raises(errors.UnsupportedModelError, match=r"q, k, v"):
        analysis.analyze(model)


def _norm_graph(spelling: str) -> ir.Value:
    """x → RMSNorm-like subgraph → Mul(gain); returns the gain Mul's output in an onnx_ir graph."""
    import onnx
    from onnx import helper as h

    nodes = [h.make_node("Pow", ["x", "two"], ["sq"]), h.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
             h.make_node("Add", ["ms", "eps"], ["mse"]), h.make_node("Sqrt", ["mse"], ["rms"])]
    if spelling == "reciprocal":
        nodes += [h.make_node("Reciprocal", ["rms"], ["inv"]), h.make_node("Mul", ["x", "inv"], ["normed"])]
    elif spelling == "div-one":
        nodes += [h.make_node("Div", ["one", "rms"], ["inv"]), h.make_node("Mul", ["inv", "x"], ["normed"])]
    elif spelling == "div":
        nodes += [h.make_node("Div", ["x", "rms"], ["normed"])]
    else:  # not a norm: x scaled by the rms instead of divided
        nodes += [h.make_node("Mul", ["x", "rms"], ["normed"])]
    nodes.append(h.make_node("Mul", ["normed", "gain"], ["y"]))
    inits = [onnx.numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
             [("two", 2.0), ("eps", 1e-5), ("one", 1.0), ("gain", np.ones(8))]]
    inits.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])], inits)
    model = ir.serde.deserialize_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]))
    return model.graph.outputs[0]


@pytest.mark.parametrize("spelling", ["reciprocal", "div-one", "div"])
def test_rmsnorm_spellings_are_recognised(spelling):
    norm = analysis.match_norm(_norm_graph(spelling))
    assert norm is not None and norm.kind == "rms"
    assert norm.input.name == "x" and norm.gain.name == "gain"


def test_a_scaled_input_is_not_a_norm():
    assert analysis.match_norm(_norm_graph("times-rms")) is None
