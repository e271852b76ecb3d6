"""One recipe, every target: ort-int4, trt-int4 (+ TensorRT-RTX engine), edge-int4, in one run.

    python benchmarks/bench_targets.py [--windows 128] [--source smollm2-135m]

Per target: size, perplexity executed by ONNX Runtime (the trt-int4 graph too), compile time, the
TensorRT-RTX engine's build time and size, the edge package's folder and zip size, and `verify` across
targets (trt-int4 against ort-int4 and edge-int4 compiled with --positive-scales, TensorRT's
convention). ONNX Runtime's own MatMulNBitsQuantizer (RTN g128 symmetric, lm_head float) and qcompile's
default signed-scale RTN are rows too, for the cost of TensorRT's positive scales.
Writes benchmarks/results/targets.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

import qcompile
from qcompile import artifact, engine, evaluation, fidelity, runtime

from bench_int4_peers import ort_matmul_nbits_quantizer
from _results import meta, save

def folder_mb(folder: pathlib.Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--source", default="smollm2-135m")
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="qcompile-bench-targets-"))
    float_dir = qcompile.export(args.source)
    rows: list[dict] = [{"name": "float (ORT fp32)", "path": float_dir / "model.onnx"}]

    start = time.perf_counter()
    path = ort_matmul_nbits_quantizer(float_dir, work / "ort-rtn", True, 128)
    rows.append({"name": "ORT MatMulNBitsQuantizer RTN g128 sym, lm_head float", "path": path,
                 "compile_s": round(time.perf_counter() - start, 1)})

    arts = {}
    for i, (name, target, kwargs) in enumerate([
        ("qcompile ort-int4 RTN g128 sym, lm_head float", "ort-int4", dict(lm_head_bits=None)),
        ("qcompile ort-int4 (default: signed scales, lm_head int8)", "ort-int4", {}),
        ("qcompile ort-int4 --positive-scales (trt-int4's integers)", "ort-int4", dict(positive_scales=True)),
        ("qcompile trt-int4 (default: positive scales, lm_head int8)", "trt-int4", {}),
        ("qcompile edge-int4 --positive-scales --embeddings float", "edge-int4",
         dict(positive_scales=True, embedding_bits=None)),
    ]):
        start = time.perf_counter()
        art = qcompile.compile(float_dir / "model.onnx", target, work / f"{i}-{target}",
                               eval_windows=None, **kwargs)
        arts[name] = art
        row = {"name": name, "path": art.model_path, "compile_s": round(time.perf_counter() - start, 1)}
        if target == "trt-int4":
            record = engine.build(art.path)
            row.update(engine_build_s=record["build_seconds"], engine_mb=round(record["bytes"] / 1e6, 1),
                       engine_builder=f"{record['builder']} {record['version']}", engine_deserialized=record["deserialized"])
        if target == "edge-int4":
            row.update(package_mb=folder_mb(art.path),
                       zip_mb=round(art.path.with_name(art.path.name + ".zip").stat().st_size / 1e6, 1))
        rows.append(row)

    ort, trt, edge = (arts[n] for n in list(arts)[2:])
    verify = {f"{a.manifest['target']['name']} vs {b.manifest['target']['name']}": fidelity.verify(a.path, b.path)
              for a, b in ((trt, ort), (edge, trt))}
    same_file = artifact.file_hashes(ort.path)["model.onnx.data"] == artifact.file_hashes(edge.path)["model.onnx.data"]

    base_predictions = None
    for row in rows:
        if row["name"].startswith("qcompile edge") and same_file:
            twin = next(r for r in rows if r["name"].startswith("qcompile ort-int4 --positive-scales"))
            row.update({k: v for k, v in twin.items() if k in ("ppl", "tokens", "argmax_agreement")},
                       note="same model.onnx.data as ort-int4 --positive-scales (sha256)")
        else:
            print(f"perplexity: {row['name']}", flush=True)
            ppl = evaluation.perplexity(runtime.Decoder(row["path"]), runtime.load_tokenizer(row["path"].parent), args.windows)
            base_predictions = ppl.predictions if base_predictions is None else base_predictions
            row.update(ppl=round(ppl.ppl, 3), tokens=ppl.tokens,
                       argmax_agreement=round(float((ppl.predictions == base_predictions).mean()), 4))
        row["size_mb"] = round(artifact.model_bytes(row["path"]) / 1e6, 1)
        row["path"] = str(row["path"])
    for row in rows:
        row["ppl_delta_pct"] = round(100 * (row["ppl"] / rows[0]["ppl"] - 1), 2)

    lines = [
        f"Perplexity on WikiText-2 test, {args.windows} × 512-token windows, executed by ONNX Runtime CPU (the "
        "trt-int4 graph too).",
        "",
        "| model | ppl | Δ vs float | argmax agree | ONNX MB | compile s | engine | edge package |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        eng = (f"{r['engine_mb']:.0f} MB, built in {r['engine_build_s']:.0f} s ({r['engine_builder']})"
               if "engine_mb" in r else "")
        pkg = f"folder {r['package_mb']:.0f} MB, zip {r['zip_mb']:.0f} MB" if "zip_mb" in r else ""
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['ppl_delta_pct']:+.2f} % | {100 * r['argmax_agreement']:.1f} % | "
                     f"{r['size_mb']:.0f} | {r.get('compile_s', '-')} | {eng} | {pkg} |")
    lines.append("")
    for name, report in verify.items():
        lg = report["logits"]
        lines.append(f"- verify {name}: {'passed' if report['passed'] else 'FAILED'}, {report['layers']} linears "
                     f"bit-identical; max |Δlogits| {lg['max_abs_logit_diff']:.2e}, argmax agreement "
                     f"{100 * lg['argmax_agreement']:.0f} % over {lg['tokens']} tokens")
    save("targets", {"meta": meta(windows=args.windows, source=args.source), "rows": rows, "verify": verify}, lines)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
