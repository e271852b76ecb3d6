"""qcompile ort-int4 (RTN) against ONNX Runtime's own MatMulNBitsQuantizer, in one run, on one export.

    python benchmarks/bench_int4_peers.py [--windows 128] [--source smollm2-135m]

Every row is evaluated by the same code (qcompile.evaluation: WikiText-2 test, 512-token windows) on
the same exported float model. Perplexities for all rows first, then latencies back to back, so that
timings share machine conditions. Writes benchmarks/results/int4_peers.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time


import qcompile
from qcompile import artifact, evaluation, runtime
from _results import meta, save

def ort_matmul_nbits_quantizer(float_dir: pathlib.Path, out_dir: pathlib.Path, symmetric: bool, block: int) -> pathlib.Path:
    """The peer: onnxruntime.quantization MatMulNBitsQuantizer, default (RTN) algorithm."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(float_dir / "model.onnx"))
    quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=symmetric, bits=4))
    quantizer.process()
    out_dir.mkdir(parents=True)
    onnx.save_model(quantizer.model.model, str(out_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data")
    artifact.copy_tokenizer(float_dir, out_dir)
    return out_dir / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--source", default="smollm2-135m")
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="qcompile-bench-"))
    float_dir = qcompile.export(args.source)
    rows: list[dict] = [{"name": "float (ORT fp32)", "path": float_dir / "model.onnx", "compile_s": None}]

    def timed(name, fn):
        start = time.perf_counter()
        path = fn()
        rows.append({"name": name, "path": path, "compile_s": round(time.perf_counter() - start, 1)})

    timed("ORT MatMulNBitsQuantizer RTN g128 sym (lm_head float)",
          lambda: ort_matmul_nbits_quantizer(float_dir, work / "ort-rtn", True, 128))
    for name, kwargs in [
        ("qcompile ort-int4 RTN g128 sym, lm_head float, acc0", dict(lm_head_bits=None, accuracy_level=0)),
        ("qcompile ort-int4 RTN g128 sym, lm_head float, acc4", dict(lm_head_bits=None, accuracy_level=4)),
        ("qcompile ort-int4 default (lm_head int8, acc4)", dict()),
    ]:
        out = work / name.replace(" ", "_").replace(",", "")
        timed(name, lambda out=out, kwargs=kwargs: qcompile.compile(
            float_dir / "model.onnx", "ort-int4", out, eval_windows=None, **kwargs).model_path)

    base_predictions = None
    for row in rows:
        print(f"perplexity: {row['name']}", flush=True)
        decoder = runtime.Decoder(row["path"])
        ppl = evaluation.perplexity(decoder, runtime.load_tokenizer(row["path"].parent), args.windows)
        if base_predictions is None:
            base_predictions = ppl.predictions
        row.update(ppl=round(ppl.ppl, 3), tokens=ppl.tokens,
                   argmax_agreement=round(float((ppl.predictions == base_predictions).mean()), 4),
                   size_mb=round(artifact.model_bytes(row["path"]) / 1e6, 1))
    for row in rows:
        print(f"latency: {row['name']}", flush=True)
        row.update(evaluation.latency(runtime.Decoder(row["path"])))
    base = rows[0]
    for row in rows:
        row["ppl_delta_pct"] = round(100 * (row["ppl"] / base["ppl"] - 1), 2)
        row["decode_speedup"] = round(base["decode_ms_per_token"] / row["decode_ms_per_token"], 2)
        row["path"] = str(row["path"])

    lines = [
        f"Perplexity on WikiText-2 test, {args.windows} × 512-token windows; latency: 512-token prefill, "
        "median decode ms/token after it (ORT CPU).",
        "",
        "| model | ppl | Δ vs float | argmax agree | size MB | prefill ms | decode ms/tok | decode speedup | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['ppl_delta_pct']:+.2f} % | {100 * r['argmax_agreement']:.1f} % | "
                     f"{r['size_mb']:.0f} | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.1f} | "
                     f"{r['decode_speedup']:.2f}× | {r['compile_s'] if r['compile_s'] is not None else '-'} |")
    save("int4_peers", {"meta": meta(windows=args.windows, source=args.source), "rows": rows}, lines)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
