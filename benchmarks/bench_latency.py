"""Decode and prefill latency of several models, interleaved round by round so that machine noise hits
every model alike; each model's best round is reported.

    python benchmarks/bench_latency.py MODEL_DIR_OR_ONNX [...] [--rounds 5]

Writes benchmarks/results/<--name, default latency>.{json,md}; the first model is the baseline of the speedup column.
"""

from __future__ import annotations

import argparse

from qcompile import evaluation, runtime
from _results import save

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="latency", help="results/<name>.{json,md}")
    args = parser.parse_args()
    decoders = [runtime.Decoder(m) for m in args.models]
    prefill = [float("inf")] * len(decoders)
    decode = [float("inf")] * len(decoders)
    for _ in range(args.rounds):
        for i, decoder in enumerate(decoders):
            r = evaluation.latency(decoder, rounds=1)
            prefill[i] = min(prefill[i], r["prefill_ms"])
            decode[i] = min(decode[i], r["decode_ms_per_token"])
    rows = [{"model": m, "prefill_ms": p, "decode_ms_per_token": d, "decode_speedup": round(decode[0] / d, 2)}
            for m, p, d in zip(args.models, prefill, decode)]
    lines = ["| model | prefill 512 ms | decode ms/token | decode speedup |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.1f} | {r['decode_speedup']:.2f}× |"
              for r in rows]
    save(args.name, {"rounds": args.rounds, "rows": rows}, lines)


if __name__ == "__main__":
    main()
