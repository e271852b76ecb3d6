"""QuaRot on SmolLM2: W4A4, W4A4 + 4-bit KV cache and W4A8, unrotated against rotated, one run.

    python benchmarks/bench_quarot.py [--windows 128] [--calib-samples 128] [--clip 0.75]

Weights: 4-bit, group 128, symmetric (lm_head 8-bit, weight-only), by RTN or GPTQ (parallel), quantized
once per (rotation, algorithm) and shared by the rows built on them. Rows: float; ort-int4 (RTN); W4A4 =
int4 per-token activations (clip ratio --clip) on every block linear, RTN unrotated / RTN rotated / GPTQ
rotated; W4A4 KV4 (4-bit KV cache, static per head and channel) GPTQ rotated and unrotated; W4A8 =
ort-w4a8 (MatMulNBits accuracy_level 4: int8 activations) GPTQ unrotated and rotated. Rotated W4A4 rows come
in both rotations of the block norms' outputs: "residual" (QuaRot's residual-stream rotation) and
"smoothed" (SmoothRotateNormOutputs: per-channel scales, then an online Hadamard, and down_proj's input scaled
the same way before its Hadamard; `qcompile`'s default for int4 activations), calibrated on the GPTQ windows. W4A4 rows run
MatMulNBits at accuracy_level 0 so the int4 fake quantization is the only activation rounding.
Each row is built as `qcompile model` builds it: rotated rows with int4 activations or a 4-bit cache also
get the attention Hadamards (o_proj's input, post-RoPE queries and keys), and every row is lowered by
the ort-w4a8 target's passes (attention and norm fusions included).
The cost of the online Hadamards is the decode latency of W4A8 rotated over W4A8 unrotated (same
weights format; they differ only by the Hadamard ops). Writes benchmarks/results/quarot.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

import onnx_ir as ir

import qcompile
from qcompile import artifact, calibration, evaluation, pipeline, recipe, runtime, targets
from qcompile.passes import Calibrate, QuantizeActivations, QuantizeKVCache
from qcompile.schemes import ActivationKind, Algorithm
from _results import meta, save

# name: (rotation of the norm outputs or None, algorithm, int4 activations, 4-bit KV cache, MatMulNBits accuracy_level)
ROWS = {
    "ort-int4 (RTN g128, unrotated)": (None, Algorithm.RTN, False, False, 4),
    "W4A4 RTN unrotated": (None, Algorithm.RTN, True, False, 0),
    "W4A4 RTN rotated (residual)": ("residual", Algorithm.RTN, True, False, 0),
    "W4A4 RTN rotated (smoothed)": ("smoothed", Algorithm.RTN, True, False, 0),
    "W4A4 GPTQ rotated (residual)": ("residual", Algorithm.GPTQ, True, False, 0),
    "W4A4 GPTQ rotated (smoothed)": ("smoothed", Algorithm.GPTQ, True, False, 0),
    "W4A4 KV4 GPTQ unrotated": (None, Algorithm.GPTQ, True, True, 0),
    "W4A4 KV4 GPTQ rotated (residual)": ("residual", Algorithm.GPTQ, True, True, 0),
    "W4A4 KV4 GPTQ rotated (smoothed)": ("smoothed", Algorithm.GPTQ, True, True, 0),
    "W4A8 GPTQ unrotated (ort-w4a8 --no-rotate)": (None, Algorithm.GPTQ, False, False, 4),
    "W4A8 GPTQ rotated (ort-w4a8)": ("residual", Algorithm.GPTQ, False, False, 4),
}


def canonical(float_dir: pathlib.Path, rotation: str | None, attention: bool, algorithm: Algorithm, windows,
              out: pathlib.Path) -> tuple[pathlib.Path, float]:
    """The float model (rotated or not; with the attention Hadamards or not) with 4-bit weights in the
    canonical form; returns (path, seconds)."""
    start = time.perf_counter()
    model = artifact.load_onnx(float_dir / "model.onnx")
    plan = recipe.resolve("ort-w4a8", None, {"algo": algorithm.value, "rotate": rotation is not None, "rotation": rotation,
                                             "attention_hadamards": attention if rotation else None})
    pipeline.run_passes(model, pipeline.build_passes(plan, windows))
    ir.save(model, out, external_data=f"{out.name}.data")
    return out, time.perf_counter() - start


def variant(canon: pathlib.Path, acts: bool, kv4: bool, accuracy_level: int, clip: float, out_dir: pathlib.Path,
            float_dir: pathlib.Path, windows) -> pathlib.Path:
    model = ir.load(canon)
    if acts:
        QuantizeActivations(ActivationKind.INT4_DYNAMIC, lm_head=False, clip=clip)(model)
    if kv4:  # its scales calibrated on the weight-quantized model (the pipeline measures the float one)
        kv = QuantizeKVCache(4)
        pipeline.run_passes(model, [Calibrate(windows, [kv]), kv])
    plan = recipe.resolve("ort-w4a8", None, {"accuracy_level": accuracy_level})
    pipeline.run_passes(model, targets.get("ort-w4a8").lowering_passes(plan, pipeline.context_length(float_dir)))
    out_dir.mkdir(parents=True)
    ir.save(model, out_dir / "model.onnx", external_data="model.onnx.data")
    artifact.copy_tokenizer(float_dir, out_dir)
    return out_dir / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--calib-samples", type=int, default=calibration.DEFAULT_SAMPLES)
    parser.add_argument("--clip", type=float, default=recipe.INT4_CLIP)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--rows", nargs="*", help="only these rows (names as in the table)")
    parser.add_argument("--keep", type=pathlib.Path, help="keep the models in this new folder (e.g. for bench_latency.py)")
    args = parser.parse_args()

    work = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="qcompile-bench-quarot-"))
    work.mkdir(parents=True, exist_ok=bool(args.keep is None))
    float_dir = qcompile.export(args.source)
    windows = calibration.calibration_windows(runtime.load_tokenizer(float_dir), None, args.calib_samples)
    rows: list[dict] = [{"name": "float (ORT fp32)", "path": float_dir / "model.onnx", "quantize_s": None}]
    canonicals: dict[tuple[str | None, bool, Algorithm], tuple[pathlib.Path, float]] = {}
    for i, (name, (rotation, algorithm, acts, kv4, level)) in enumerate(ROWS.items()):
        if args.rows and name not in args.rows:
            continue
        plan = recipe.resolve("ort-w4a8", None, {"rotate": rotation is not None, "kv_cache_bits": 4 if kv4 else None,
                                                 "activations": "int4-dynamic" if acts else None})
        key = (rotation, plan.rotation.attention_hadamards, algorithm)
        if key not in canonicals:
            print(f"quantize: {f'rotated ({rotation})' if rotation else 'unrotated'}{' + attention' if key[1] else ''} "
                  f"{algorithm.value}", flush=True)
            canonicals[key] = canonical(float_dir, *key, windows, work / f"c{len(canonicals)}.onnx")
        canon, seconds = canonicals[key]
        rows.append({"name": name, "path": variant(canon, acts, kv4, level, args.clip, work / f"v{i}", float_dir, windows),
                     "quantize_s": round(seconds, 1)})

    base_predictions = None
    for row in rows:
        print(f"perplexity: {row['name']}", flush=True)
        ppl = evaluation.perplexity(runtime.Decoder(row["path"]), runtime.load_tokenizer(row["path"].parent), args.windows)
        if base_predictions is None:
            base_predictions = ppl.predictions
        row.update(ppl=round(ppl.ppl, 3), argmax_agreement=round(float((ppl.predictions == base_predictions).mean()), 4),
                   size_mb=round(artifact.model_bytes(row["path"]) / 1e6, 1))
    for row in rows:
        print(f"latency: {row['name']}", flush=True)
        row.update(evaluation.latency(runtime.Decoder(row["path"])))
    base = rows[0]
    for row in rows:
        row["ppl_ratio"] = round(row["ppl"] / base["ppl"], 3)
        row["decode_vs_fp32"] = round(row["decode_ms_per_token"] / base["decode_ms_per_token"], 3)
        row["path"] = str(row["path"])
    by_name = {r["name"]: r for r in rows}
    notes = []
    rot, unrot = by_name.get("W4A8 GPTQ rotated (ort-w4a8)"), by_name.get("W4A8 GPTQ unrotated (ort-w4a8 --no-rotate)")
    if rot and unrot:
        notes.append(f"- online Hadamard cost (W4A8 rotated / unrotated decode): "
                     f"{rot['decode_ms_per_token'] / unrot['decode_ms_per_token']:.3f}×")
    lines = [
        f"Perplexity on WikiText-2 test, {args.windows} × 512-token windows; latency: 512-token prefill, median decode "
        f"ms/token after it (ORT CPU, 2 cores). Weights 4-bit g128 symmetric, lm_head 8-bit weight-only; "
        f"GPTQ on {args.calib_samples} × 512 calibration tokens; W4A4 activation clip ratio {args.clip}.",
        "",
        "| model | ppl | × float | argmax agree | size MB | prefill ms | decode ms/tok | decode / fp32 | quantize s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} | {100 * r['argmax_agreement']:.1f} % | "
                     f"{r['size_mb']:.0f} | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['decode_vs_fp32']:.2f}× | {r['quantize_s'] if r['quantize_s'] is not None else '-'} |")
    lines += ([""] + notes) if notes else []
    save("quarot", {"meta": meta(windows=args.windows, source=args.source, calib_samples=args.calib_samples,
                                 clip=args.clip), "rows": rows}, lines)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
