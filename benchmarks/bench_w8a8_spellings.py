"""Which ONNX Runtime CPU op runs a W8A8 linear fastest: one run, SmolLM2-135M's linear shapes.

    python benchmarks/bench_w8a8_spellings.py [--repeats 50]

The same int8 per-channel weights in four spellings, timed at M = 1 (decode) and M = 512 (prefill):
- fp32 MatMul (the float reference);
- com.microsoft.MatMulNBits bits=8, accuracy_level 4 (activations int8 per token and block of 128);
- com.microsoft.DynamicQuantizeMatMul (activations uint8, one dynamic scale per tensor);
- DynamicQuantizeLinear → com.microsoft.MatMulIntegerToFloat (the same activation scheme, unfused).
Also the error of each against fp32 on Gaussian inputs with outlier channels. Writes
benchmarks/results/w8a8_spellings.{json,md}; ort-w8a8 uses the spelling that wins here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T, helper, numpy_helper

from qcompile.algorithms.rtn import quantize_rtn
from qcompile.targets.ort import PER_CHANNEL_BLOCK, pack_matmul_nbits
from _results import meta, save

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576), "lm_head": (576, 49152)}


def _model(spelling: str, w: np.ndarray) -> bytes:
    k, n = w.shape
    qw = quantize_rtn(w, 8, 0, True)
    q, scale = qw.q, qw.scale[0]
    x = helper.make_tensor_value_info("x", T.FLOAT, ["m", k])
    y = helper.make_tensor_value_info("y", T.FLOAT, ["m", n])
    inits, nodes = [], []
    if spelling == "fp32":
        inits = [numpy_helper.from_array(qw.dequantize(), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    elif spelling == "MatMulNBits-8 acc4":
        groups = -(-k // PER_CHANNEL_BLOCK)
        b, s, _ = pack_matmul_nbits(q, np.repeat(scale[None], groups, 0), None, 8, PER_CHANNEL_BLOCK)
        inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(s, "s")]
        nodes = [helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                  block_size=PER_CHANNEL_BLOCK, accuracy_level=4)]
    else:
        inits = [numpy_helper.from_array(q, "b"), numpy_helper.from_array(scale, "bs"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "bz")]
        if spelling == "DynamicQuantizeMatMul":
            nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "b", "bs", "bz"], ["y"], domain="com.microsoft")]
        else:
            nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                     helper.make_node("MatMulIntegerToFloat", ["xq", "b", "xs", "bs", "xz", "bz"], ["y"],
                                      domain="com.microsoft")]
    graph = helper.make_graph(nodes, "linear", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


SPELLINGS = ["fp32", "MatMulNBits-8 acc4", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"]


def _time(session: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    for _ in range(3):
        session.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"x": x})
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        w = (rng.normal(size=(k, n)) * 0.05).astype(np.float32)
        x512 = rng.normal(size=(512, k)).astype(np.float32)
        x512[:, :4] *= 20  # outlier channels
        ref = x512 @ quantize_rtn(w, 8, 0, True).dequantize()
        for spelling in SPELLINGS:
            session = ort.InferenceSession(_model(spelling, w), providers=["CPUExecutionProvider"])
            out = session.run(None, {"x": x512})[0]
            rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            rows.append({"shape": name, "K": k, "N": n, "spelling": spelling, "rel_error": round(rel, 5),
                         "decode_ms": round(_time(session, x512[:1], args.repeats), 4),
                         "prefill_ms": round(_time(session, x512, max(args.repeats // 10, 3)), 3)})
            print(rows[-1], flush=True)
    totals = {s: {m: round(sum(r[m] for r in rows if r["spelling"] == s), 3) for m in ("decode_ms", "prefill_ms")}
              for s in SPELLINGS}
    lines = ["| shape | K×N | spelling | decode M=1 ms | prefill M=512 ms | rel. error vs fp32 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['K']}×{r['N']} | {r['spelling']} | {r['decode_ms']:.3f} | {r['prefill_ms']:.2f} | "
              f"{r['rel_error']:.4f} |" for r in rows]
    lines += ["", "| spelling | Σ decode ms (one of each shape) | Σ prefill ms |", "|---|---|---|"]
    lines += [f"| {s} | {t['decode_ms']:.3f} | {t['prefill_ms']:.2f} |" for s, t in totals.items()]
    save("w8a8_spellings", {"meta": meta(repeats=args.repeats), "rows": rows, "totals": totals}, lines)


if __name__ == "__main__":
    main()
