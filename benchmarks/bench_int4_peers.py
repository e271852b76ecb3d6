"""4-bit weights on SmolLM2: qcompile's RTN, GPTQ, AWQ against ONNX Runtime's own quantizers, one run, one export.

    python benchmarks/bench_int4_peers.py [--windows 128] [--groups 128 32] [--schemes sym asym]
        [--algos ...] [--asym-algos ...] [--ort-gptq-samples 8] [--name int4_peers] [--source smollm2-135m]

Rows, for every group size and symmetry asked for:
- ORT `MatMulNBitsQuantizer`: RTN (DefaultWeightOnlyQuantConfig), GPTQ (GPTQWeightOnlyQuantConfig on
  --ort-gptq-samples calibration windows; it runs the whole model once per distinct MatMul input and
  window, 121 × samples runs for SmolLM2, so 128 windows would take hours here) and HQQ (asymmetric
  with float zero points, so it appears under "asym" only).
- qcompile `ort-int4` with lm_head float (the peers' size): RTN, GPTQ parallel, GPTQ sequential, AWQ,
  AWQ+GPTQ, calibrated on 128 × 512 tokens of WikiText-2 valid.txt.
- `--extras`: qcompile's default ort-int4 lm_head int8 with AWQ+GPTQ, and GPTQ act-order.
Every row is evaluated by the same code (qcompile.evaluation: WikiText-2 test, 512-token windows) on the
same exported float model: perplexities first, then latencies back to back. Compile times are wall
seconds on this machine. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

import qcompile
from qcompile import artifact, calibration, evaluation, runtime
from _calibration_reader import WindowsReader
from _results import meta, save

QCOMPILE_ALGOS = {  # row label → compile keywords
    "RTN": dict(algo="rtn"),
    "GPTQ parallel": dict(algo="gptq"),
    "GPTQ sequential": dict(algo="gptq", gptq_mode="sequential"),
    "AWQ": dict(algo="awq"),
    "AWQ+GPTQ": dict(algo="awq+gptq"),
}


def ort_matmul_nbits(float_dir: pathlib.Path, out_dir: pathlib.Path, algo: str, symmetric: bool, block: int,
                     samples: int = 0) -> pathlib.Path:
    """The peer: onnxruntime.quantization.MatMulNBitsQuantizer with algorithm RTN, GPTQ or HQQ."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model = onnx.load(str(float_dir / "model.onnx"))
    if algo == "RTN":
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=4)
    elif algo == "HQQ":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    else:
        windows = calibration.calibration_windows(runtime.load_tokenizer(float_dir), None, samples)
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=WindowsReader(float_dir / "model.onnx", windows))
    quantizer = mnq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=symmetric, algo_config=config)
    quantizer.process()
    out_dir.mkdir(parents=True)
    onnx.save_model(quantizer.model.model, str(out_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data")
    artifact.copy_tokenizer(float_dir, out_dir)
    return out_dir / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--groups", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--schemes", nargs="+", choices=["sym", "asym"], default=["sym", "asym"])
    parser.add_argument("--algos", nargs="+", choices=list(QCOMPILE_ALGOS), default=list(QCOMPILE_ALGOS))
    parser.add_argument("--asym-algos", nargs="+", choices=list(QCOMPILE_ALGOS), help="asymmetric rows [default: --algos]")
    parser.add_argument("--ort-gptq-samples", type=int, default=8, help="0 leaves ORT's GPTQ out")
    parser.add_argument("--calib-samples", type=int, default=calibration.DEFAULT_SAMPLES, help="qcompile's calibration windows")
    parser.add_argument("--extras", action="store_true")
    parser.add_argument("--name", default="int4_peers")
    parser.add_argument("--source", default="smollm2-135m")
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="qcompile-bench-"))
    float_dir = qcompile.export(args.source)
    rows: list[dict] = []
    failed: list[str] = []
    base_predictions = None

    def evaluated(name, path, compile_s):
        nonlocal base_predictions
        print(f"perplexity: {name}", flush=True)
        ppl = evaluation.perplexity(runtime.Decoder(path), runtime.load_tokenizer(path.parent), args.windows)
        if base_predictions is None:
            base_predictions = ppl.predictions
        rows.append({"name": name, "path": str(path), "compile_s": compile_s, "ppl": round(ppl.ppl, 3), "tokens": ppl.tokens,
                     "argmax_agreement": round(float((ppl.predictions == base_predictions).mean()), 4),
                     "size_mb": round(artifact.model_bytes(path) / 1e6, 1),
                     "ppl_delta_pct": round(100 * (ppl.ppl / rows[0]["ppl"] - 1), 2) if rows else 0.0})
        write()

    def timed(name, fn, peer=False):
        print(f"compile: {name}", flush=True)
        start = time.perf_counter()
        try:
            path = fn()
        except Exception as e:  # a peer's own failure is a result, reported under the table; ours are bugs
            if not peer:
                raise
            failed.append(f"- {name}: failed after {time.perf_counter() - start:.0f} s: {type(e).__name__}: {str(e)[:200]}")
            print(failed[-1], flush=True)
            return
        evaluated(name, path, round(time.perf_counter() - start, 1))

    def qcompile_row(name, **kwargs):
        out = work / f"q{len(rows)}"
        timed(name, lambda: qcompile.compile(float_dir / "model.onnx", "ort-int4", out, eval_windows=None,
                                                calib_samples=args.calib_samples, **kwargs).model_path)

    def write():
        lines = [
            f"Perplexity on WikiText-2 test, {args.windows} × 512-token windows; latency: 512-token prefill, "
            "median decode ms/token after it (ORT CPU), measured back to back after all perplexities. qcompile rows: "
            "ort-int4 (MatMulNBits accuracy_level 4), lm_head float unless named; calibration "
            f"{args.calib_samples} × 512 tokens of WikiText-2 valid.txt.",
            "",
            "| model | ppl | Δ vs float | argmax agree | size MB | prefill ms | decode ms/tok | decode speedup | compile s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lat = (f"{r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.1f} | {r['decode_speedup']:.2f}×"
                   if "decode_speedup" in r else "- | - | -")
            lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['ppl_delta_pct']:+.2f} % | {100 * r['argmax_agreement']:.1f} % | "
                         f"{r['size_mb']:.0f} | {lat} | {r['compile_s'] if r['compile_s'] is not None else '-'} |")
        lines += ([""] + failed) if failed else []
        save(args.name, {"meta": meta(windows=args.windows, source=args.source, groups=args.groups, schemes=args.schemes,
                                      ort_gptq_samples=args.ort_gptq_samples, calib_samples=args.calib_samples),
                         "rows": rows, "failed": failed}, lines)

    evaluated("float (ORT fp32)", float_dir / "model.onnx", None)

    for group in args.groups:
        for scheme in args.schemes:
            sym = scheme == "sym"
            tag = f"g{group} {scheme}"
            timed(f"ORT RTN {tag}", lambda: ort_matmul_nbits(float_dir, work / f"o{len(rows)}", "RTN", sym, group), peer=True)
            if not sym:
                timed(f"ORT HQQ {tag}", lambda: ort_matmul_nbits(float_dir, work / f"o{len(rows)}", "HQQ", sym, group), peer=True)
            for label in args.algos if sym or not args.asym_algos else args.asym_algos:
                qcompile_row(f"qcompile {label} {tag}", group_size=group, symmetric=sym, lm_head_bits=None,
                             **QCOMPILE_ALGOS[label])
    for group in args.groups if args.ort_gptq_samples else []:  # last: hours at 128 windows, minutes at a few
        for sym in [scheme == "sym" for scheme in args.schemes]:
            timed(f"ORT GPTQ g{group} {'sym' if sym else 'asym'} ({args.ort_gptq_samples} calib windows)", lambda: ort_matmul_nbits(
                float_dir, work / f"o{len(rows)}", "GPTQ", sym, group, args.ort_gptq_samples), peer=True)
    if args.extras:
        qcompile_row("qcompile AWQ+GPTQ g128 sym, lm_head int8 (ort-int4 default width)", algo="awq+gptq")
        qcompile_row("qcompile GPTQ act-order g128 sym", algo="gptq", act_order=True, lm_head_bits=None)

    for row in rows:
        print(f"latency: {row['name']}", flush=True)
        row.update(evaluation.latency(runtime.Decoder(row["path"])))
        row["decode_speedup"] = round(rows[0]["decode_ms_per_token"] / row["decode_ms_per_token"], 2)
    write()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
