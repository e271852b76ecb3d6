"""Choose the 4-bit default by measurement: SmolLM2 compiled with each candidate recipe (all canonical:
symmetric, positive scales, so TensorRT runs the same integers), perplexity on N windows, compile time
(export cached, no evaluation) and model size.

    python benchmarks/bench_default_choice.py --windows 32

Writes benchmarks/results/default_choice.{json,md}. Uses only the public API.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import qcompile
from qcompile import artifact
from _results import RESULTS, meta, save

# TensorRT: blocks of 64 or 128; the embedding table float unless a candidate says otherwise
CANONICAL = dict(positive_scales=True, symmetric=True, lm_head_bits=4, lm_head_group_size=64, embedding_bits=None)
CANDIDATES = {
    "RTN g128": dict(algo="rtn", group_size=128),
    "GPTQ g128, 16 windows": dict(algo="gptq", group_size=128, calib_samples=16),
    "GPTQ g128, 32 windows": dict(algo="gptq", group_size=128, calib_samples=32),
    "GPTQ g64, 16 windows": dict(algo="gptq", group_size=64, calib_samples=16),
    "GPTQ g64, 32 windows": dict(algo="gptq", group_size=64, calib_samples=32),
    "GPTQ g64 act-order, 32 windows": dict(algo="gptq", group_size=64, calib_samples=32, act_order=True),
    "AWQ+GPTQ g128, 16 windows": dict(algo="awq+gptq", group_size=128, calib_samples=16),
    "rotated GPTQ g128, 16 windows": dict(algo="gptq", group_size=128, calib_samples=16, rotate=True),
    "GPTQ g64 act-order, 16 windows": dict(algo="gptq", group_size=64, calib_samples=16, act_order=True),
    "AWQ+GPTQ g64 act-order, 16 windows": dict(algo="awq+gptq", group_size=64, calib_samples=16, act_order=True),
    "rotated GPTQ g64 act-order, 16 windows": dict(algo="gptq", group_size=64, calib_samples=16, act_order=True, rotate=True),
    # the table: lm_head's GPTQ integers shared with the tied embedding (4-bit, stored once), or an 8-bit table of its own
    "GPTQ g64 act-order, 16 windows, embeddings shared 4-bit": dict(algo="gptq", group_size=64, calib_samples=16, act_order=True,
                                                                     embedding_bits=4),
    "GPTQ g64 act-order, 16 windows, embeddings 8-bit": dict(algo="gptq", group_size=64, calib_samples=16, act_order=True,
                                                              embedding_bits=8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--only", nargs="*", help="candidate names (default: all)")
    parser.add_argument("--name", default="default_choice")
    args = parser.parse_args()
    qcompile.export("smollm2-135m")  # cached: the compile times below exclude the export
    float_ppl = qcompile.evaluate("smollm2-135m", windows=args.windows, latency=False)["ppl"]
    previous = RESULTS / f"{args.name}.json"  # rows of an earlier run are kept unless measured again
    rows = json.loads(previous.read_text())["rows"] if args.only and previous.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as work:
        for name, options in CANDIDATES.items():
            if args.only and name not in args.only:
                continue
            out = pathlib.Path(work) / str(len(rows))
            started = time.perf_counter()
            qcompile.compile("smollm2-135m", "ort-int4", out, eval_windows=None, **{**CANONICAL, **options})
            seconds = time.perf_counter() - started
            ppl = qcompile.evaluate(out, windows=args.windows, latency=False)["ppl"]
            rows[name] = {"options": options, "ppl": ppl, "ppl_increase_pct": round(100 * (ppl / float_ppl - 1), 2),
                          "compile_seconds": round(seconds, 1), "size_mb": round(artifact.model_bytes(out / "model.onnx") / 1e6, 1)}
            print(name, json.dumps(rows[name]), flush=True)
    lines = [f"SmolLM2-135M, ort-int4 with symmetric positive scales, lm_head 4-bit GPTQ g64, float embeddings unless said; "
             f"perplexity on {args.windows} windows (float {float_ppl}); compile: export cached, no evaluation",
             "", "| recipe | ppl | Δ vs float | compile s | size MB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['ppl']:.2f} | {r['ppl_increase_pct']:+.2f} % | {r['compile_seconds']} | {r['size_mb']} |" for n, r in rows.items()]
    save(args.name, {"meta": meta(windows=args.windows, float_ppl=float_ppl), "rows": rows}, lines)


if __name__ == "__main__":
    main()
