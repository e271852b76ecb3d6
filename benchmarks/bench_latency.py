"""Decode and prefill latency of several models, interleaved round by round so that machine noise hits
every model alike; each model's best round is reported.

    python benchmarks/bench_latency.py MODEL_DIR_OR_ONNX [...] [--rounds 5]

Writes benchmarks/results/latency.{json,md}; the first model is the baseline of the speedup column.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from qcompile import evaluation, runtime

RESULTS = pathlib.Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    decoders = [runtime.Decoder(m) for m in args.models]
    best = [None] * len(decoders)
    for _ in range(args.rounds):
        for i, decoder in enumerate(decoders):
            r = evaluation.latency(decoder, rounds=1)
            if best[i] is None or r["decode_ms_per_token"] < best[i]["decode_ms_per_token"]:
                best[i] = {**r, "prefill_ms": min(r["prefill_ms"], (best[i] or r)["prefill_ms"])}
    rows = [{"model": m, **b, "decode_speedup": round(best[0]["decode_ms_per_token"] / b["decode_ms_per_token"], 2)}
            for m, b in zip(args.models, best)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=2))
    lines = ["| model | prefill 512 ms | decode ms/token | decode speedup |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.1f} | {r['decode_speedup']:.2f}× |"
              for r in rows]
    (RESULTS / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
