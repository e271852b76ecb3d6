"""Edge package size with and without a quantized embedding table (GatherBlockQuantized), in one run.

    python benchmarks/bench_edge_embeddings.py [--windows 128] [--source smollm2-135m]

edge-int4 (default recipe: RTN g128, signed scales, lm_head int8) with the embedding table float, int8
and int4 (blocks of 128 along the hidden size): model size, package folder and zip size, perplexity
(pinned protocol, ORT CPU), and whether onnxruntime-genai reproduces the package's golden greedy tokens.
Writes benchmarks/results/edge_embeddings.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile

import qcompile
from qcompile import artifact, evaluation, runtime
from qcompile.package import genai_greedy
from _results import meta, save

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--source", default="smollm2-135m")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="qcompile-bench-edge-"))
    float_dir = qcompile.export(args.source)
    rows = []
    for label, bits in (("float", None), ("int8", 8), ("int4", 4)):
        art = qcompile.compile(float_dir / "model.onnx", "edge-int4", work / f"edge-{label}", eval_windows=None,
                               embedding_bits=bits)
        print(f"perplexity: embeddings {label}", flush=True)
        ppl = evaluation.perplexity(runtime.Decoder(art.path), runtime.load_tokenizer(art.path), args.windows)
        golden = json.loads((art.path / "golden.json").read_text())
        rows.append({
            "embeddings": label, "ppl": round(ppl.ppl, 3), "model_mb": round(artifact.model_bytes(art.model_path) / 1e6, 1),
            "package_mb": round(sum(p.stat().st_size for p in art.path.iterdir()) / 1e6, 1),
            "zip_mb": round(art.path.with_name(art.path.name + ".zip").stat().st_size / 1e6, 1),
            "genai_matches_golden": genai_greedy(art.path, golden["prompt_ids"], len(golden["greedy_ids"])) == golden["greedy_ids"],
        })
    lines = [f"edge-int4 (RTN g128, lm_head int8) on {args.source}; perplexity on {args.windows} × 512-token WikiText-2 test windows.",
             "", "| embeddings | ppl | model MB | package MB | zip MB | onnxruntime-genai = golden |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['embeddings']} | {r['ppl']:.2f} | {r['model_mb']:.0f} | {r['package_mb']:.0f} | {r['zip_mb']:.0f} | "
                     f"{'yes' if r['genai_matches_golden'] else 'NO'} |")
    save("edge_embeddings", {"meta": meta(windows=args.windows, source=args.source), "rows": rows}, lines)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
