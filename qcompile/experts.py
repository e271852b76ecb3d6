"""Running a mixture of experts without gathering each token's expert weights.

The exported form of a MoE MLP (transformers' batched_mm, `analysis.ExpertTable`) gathers, for every (token,
chosen expert) row, that expert's whole [N, K] table and multiplies the row by it: a 512-token window of
Mixtral copies about 480 GB. That form is what the passes read and what the targets lower (ORT to QMoE), so
it stays in the models qcompile writes; only the models it runs itself (calibration, evaluation, `run`) are
grouped first:

    y[r] = table[index[r]] · x[r]   becomes, for each expert e:   rows = NonZero(index == e)
                                                                  y[rows] = x[rows] · table[e]ᵀ

(one ScatterND writes every row back). The same products, summed in another order; a window then holds its
rows' activations and one expert's table at a time (a 4-bit canonical table is dequantized whole, one table
at a time: ORT's Gather has no 4-bit types).
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompile import analysis


def gathered_tables(model: ir.Model) -> list[tuple[ir.Node, ir.Node, tuple[int, int, int]]]:
    """(gather, MatMul, table shape) for each MatMul of `model` reading an expert table's gather
    (`analysis.gathered_table`; on axis 0, no batch dims, one [N, K] table a row) directly: found from the graph
    alone, without a whole-model analysis, so in lowered models and peers' models too."""
    found = []
    for node in model.graph:
        for reader in {v.producer() for v in node.inputs if v is not None} if node.op_type == "MatMul" else ():
            if (reader is not None and analysis.gathered_table(reader) is not None and reader.inputs[0].shape.is_static()
                    and not reader.attributes.get_int("axis", 0) and not reader.attributes.get_int("batch_dims", 0)
                    and len(reader.outputs[0].shape or ()) == 3):
                found.append((reader, node, tuple(reader.inputs[0].shape)))
    return found


def group(model: ir.Model) -> int:
    """Rewrite every gathered expert table's batched MatMul in `model` per expert (module docstring), in place;
    how many tables."""
    tables = gathered_tables(model)
    for reader, matmul, shape in tables:
        _group(model.graph, reader, matmul, shape)
    if tables:
        RemoveUnusedNodesPass()(model)
    return len(tables)


def grouped_copy(path: pathlib.Path, folder: pathlib.Path) -> pathlib.Path | None:
    """`path`'s model with its experts grouped, saved in `folder` (its weights written again); None when it has
    no expert tables to group."""
    model = ir.load(path)
    if not group(model):
        return None
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    return folder / "model.onnx"


def _group(graph: ir.Graph, reader: ir.Node, matmul: ir.Node, shape: tuple[int, int, int]) -> None:
    """`matmul` = MatMul(gathered [R, N, K], x [R, K, 1]) (W·x) or MatMul(x [R, 1, K], gathered [R, K, N]) (x·W)."""
    weights_first = matmul.inputs[0] is reader.outputs[0]
    experts, n, k = shape if weights_first else (shape[0], shape[2], shape[1])
    index, x = reader.inputs[1], matmul.inputs[1 if weights_first else 0]
    name = f"{matmul.name}.grouped"
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list, **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes, name=f"{name}.{len(nodes)}")
        node.outputs[0].name = f"{name}.{len(nodes)}"
        nodes.append(node)
        return node.outputs[0]

    def const(array: np.ndarray) -> ir.Value:
        return add("Constant", [], value=ir.tensor(array))

    def expert_table(e: int) -> ir.Value:
        """Table e, float. An 8-bit table's integers and scales are gathered first, so that one expert at a time
        is dequantized; ORT's Gather has no 4-bit types, so a 4-bit table is dequantized whole (per window)."""
        at, table = const(np.array(e, np.int64)), reader.inputs[0]
        dq = table.producer()
        scale = dq.inputs[1] if dq is not None and dq.op_type == "DequantizeLinear" else None
        if (scale is None or dq.inputs[0].dtype not in (ir.DataType.INT8, ir.DataType.UINT8) or scale.shape is None
                or len(scale.shape) != 3 or dq.attributes.get_int("axis", 1) not in (1, 2)):
            return add("Gather", [table, at], axis=0)
        parts = [add("Gather", [v, at], axis=0) for v in dq.inputs if v is not None]  # q, scale, zero point
        attributes = {a.name: a.value for a in dq.attributes.values()}
        return add("DequantizeLinear", parts, **{**attributes, "axis": dq.attributes.get_int("axis", 1) - 1})

    index = add("Reshape", [index, const(np.array([-1], np.int64))])  # [R]
    rows_in = add("Reshape", [x, const(np.array([-1, k], np.int64))])  # [R, K]
    rows, products = [], []
    for e in range(experts):
        hit = add("Equal", [index, const(np.array(e, (reader.inputs[1].dtype or ir.DataType.INT64).numpy()))])
        where = add("Reshape", [add("NonZero", [hit]), const(np.array([-1, 1], np.int64))])  # [n_e, 1]
        weight = expert_table(e)  # [N, K] or [K, N]
        picked = add("GatherND", [rows_in, where])  # [n_e, K]
        products.append(add("Gemm", [picked, weight], transB=int(weights_first)))  # [n_e, N]
        rows.append(where)
    old = matmul.outputs[0]
    zeros = add("ConstantOfShape", [add("Concat", [add("Shape", [index]), const(np.array([n], np.int64))], axis=0)],
                value=ir.tensor(np.zeros(1, (old.dtype or ir.DataType.FLOAT).numpy())))
    out = add("ScatterND", [zeros, add("Concat", rows, axis=0), add("Concat", products, axis=0)])  # [R, N]
    out = add("Unsqueeze", [out, const(np.array([2 if weights_first else 1], np.int64))])  # as the MatMul's output
    ir.convenience.replace_all_uses_with(old, out)
    if old in graph.outputs:
        graph.outputs[list(graph.outputs).index(old)] = out
    out.name, old.name, out.shape, out.type = old.name, f"{old.name}_gathered", old.shape, old.type
    graph.insert_after(matmul, nodes)
