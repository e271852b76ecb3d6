"""W8A8 on SmolLM2: qcompile's SmoothQuant recipes against ONNX Runtime's own int8 quantizers, one run.

    python benchmarks/bench_w8a8.py [--windows 128] [--peer-calib 32] [--rows NAME ...]

Rows: float; ORT quantize_dynamic (int8 per-channel weights, dynamic uint8 activations); ORT
quantize_static (QDQ, per-tensor MinMax, no smoothing; calibrated on --peer-calib windows of
valid.txt, as its calibrator keeps every batch's outputs in memory; uint8 activations, its default: with
int8 activations ORT 1.32 writes a graph ORT cannot load, "QuantizeLinear output_dtype INT8 does not match
y_zero_point type UINT8"); qcompile trt-int8 (static per-tensor
int8, executed by ORT) with and without SmoothQuant; ort-w8a8 (dynamic per-token, SmoothQuant), canonical
(our per-token op) and lowered (MatMulNBits acc4); trt-fp8 (executed by ORT).
The default trt-int8 and trt-fp8 artifacts also get a TensorRT-RTX engine (build time and size).
All rows are evaluated by the same code on the same exported model: perplexity first, then latencies
back to back. Writes benchmarks/results/w8a8.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

import qcompile
from qcompile import artifact, calibration, engine, evaluation, runtime
from _calibration_reader import WindowsReader
from _results import meta, save


def _save_onnx(model, out_dir: pathlib.Path, float_dir: pathlib.Path) -> pathlib.Path:
    import onnx

    out_dir.mkdir(parents=True)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")
    artifact.copy_tokenizer(float_dir, out_dir)
    return out_dir / "model.onnx"


def ort_quantize_dynamic(float_dir: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True)
    quantize_dynamic(float_dir / "model.onnx", out_dir / "model.onnx", weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True)
    artifact.copy_tokenizer(float_dir, out_dir)
    return out_dir / "model.onnx"


def ort_quantize_static(float_dir: pathlib.Path, out_dir: pathlib.Path, samples: int) -> pathlib.Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    windows = calibration.calibration_windows(runtime.load_tokenizer(float_dir), None, samples)
    out_dir.mkdir(parents=True)
    quantize_static(float_dir / "model.onnx", out_dir / "model.onnx", WindowsReader(float_dir / "model.onnx", windows),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=False, op_types_to_quantize=["MatMul"], calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=True)
    artifact.copy_tokenizer(float_dir, out_dir)
    return out_dir / "model.onnx"


QCOMPILE_ROWS = {
    "qcompile trt-int8 (static per-tensor, SmoothQuant)": ("trt-int8", {}),
    "qcompile trt-int8 without SmoothQuant": ("trt-int8", dict(smoothquant=False)),
    "qcompile ort-w8a8 canonical (per-token op, SmoothQuant)": ("ort-w8a8", dict(accuracy_level=0)),
    "qcompile ort-w8a8 (MatMulNBits-8 acc4)": ("ort-w8a8", {}),
    "qcompile trt-fp8 (static per-tensor, SmoothQuant)": ("trt-fp8", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--peer-calib", type=int, default=32)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="qcompile-bench-w8a8-"))
    float_dir = qcompile.export(args.source)
    rows: list[dict] = [{"name": "float (ORT fp32)", "path": float_dir / "model.onnx", "compile_s": None}]
    failed: list[str] = []

    def timed(name, fn):
        print(f"compile: {name}", flush=True)
        start = time.perf_counter()
        path = fn()
        rows.append({"name": name, "path": path, "compile_s": round(time.perf_counter() - start, 1)})

    if not args.no_peers:
        timed("ORT quantize_dynamic int8 per-channel", lambda: ort_quantize_dynamic(float_dir, work / "ort-dynamic"))
        timed(f"ORT quantize_static QDQ per-tensor MinMax ({args.peer_calib} calib windows)",
              lambda: ort_quantize_static(float_dir, work / "ort-static", args.peer_calib))
    for i, (name, (target, kwargs)) in enumerate(QCOMPILE_ROWS.items()):
        timed(name, lambda i=i, target=target, kwargs=kwargs: qcompile.compile(
            float_dir / "model.onnx", target, work / f"q{i}", eval_windows=None, **kwargs).model_path)
        if target.startswith("trt-") and not kwargs:
            try:
                record = engine.build(work / f"q{i}")
                rows[-1]["engine"] = f"{record['bytes'] / 1e6:.0f} MB, built in {record['build_seconds']:.0f} s ({record['builder']})"
            except qcompile.QcompileError as e:  # no TensorRT installed: the row stays, without an engine
                rows[-1]["engine"] = f"not built: {e}"

    base_predictions = None
    for row in list(rows):
        print(f"perplexity: {row['name']}", flush=True)
        try:
            decoder = runtime.Decoder(row["path"])
        except qcompile.QcompileError as e:  # a peer's graph ORT cannot load: report it, keep the run
            print(f"  dropped: {e}", flush=True)
            rows.remove(row)
            failed.append(f"- {row['name']}: {e}")
            continue
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
        row["decode_vs_fp32"] = round(row["decode_ms_per_token"] / base["decode_ms_per_token"], 3)
        row["path"] = str(row["path"])

    lines = [
        f"Perplexity on WikiText-2 test, {args.windows} × 512-token windows; latency: 512-token prefill, "
        "median decode ms/token after it (ORT CPU, 2 cores). TensorRT rows are the TensorRT graphs executed by ORT.",
        "",
        "| model | ppl | Δ vs float | argmax agree | size MB | prefill ms | decode ms/tok | decode / fp32 | compile s | engine |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['ppl_delta_pct']:+.2f} % | {100 * r['argmax_agreement']:.1f} % | "
                     f"{r['size_mb']:.0f} | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.1f} | "
                     f"{r['decode_vs_fp32']:.2f}× | {r['compile_s'] if r['compile_s'] is not None else '-'} | {r.get('engine', '')} |")
    lines += ([""] + failed) if failed else []
    save("w8a8", {"meta": meta(windows=args.windows, source=args.source, peer_calib=args.peer_calib), "rows": rows}, lines)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
