"""Defaults against the peer's defaults, in one run on SmolLM2-135M.

    python benchmarks/bench_defaults.py [--windows 128] [--rounds 3]

1. `qcompile model` as a new user runs it (ort-int4 defaults, evaluation on 32 windows) on a fresh cache:
   wall time split by stage (export, calibration, quantization, lowering, evaluation).
2. The default ort-int4, edge-int4 and trt-int4 artifacts from one `compile_many` (quantized once) and
   `verify_all` across them; trt-int4's Q/DQ model is executed by ONNX Runtime.
3. onnxruntime-genai's builder `-p int4 -e cpu` (its defaults) on an HF folder saved from the same GGUF.
Every model: perplexity on --windows windows, size, prefill-512 ms and decode ms/token after 128- and
1024-token prompts (rounds interleaved across models, best round each), as ratios to the builder's.
Writes benchmarks/results/defaults.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import qcompile
from qcompile import artifact, evaluation, runtime
from _results import meta, save
from bench_decode_peers import build_genai

TARGETS = ["ort-int4", "edge-int4", "trt-int4"]
PEER = "onnxruntime-genai builder int4"
PROMPTS = (128, 1024)


class Stages:
    """A progress reporter that keeps each task's wall time (its start to its last step)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def task(self, description: str, total: int | None):
        start = time.perf_counter()
        self.seconds[description] = 0.0

        def advance() -> None:
            self.seconds[description] = round(time.perf_counter() - start, 1)

        return advance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qcompile-bench-defaults-") as tmp:
        work = pathlib.Path(tmp)
        os.environ["QCOMPILE_CACHE_DIR"] = str(work / "cache")  # fresh: the export is part of the first compile
        stages = Stages()
        started = time.perf_counter()
        first = qcompile.compile("smollm2-135m", "ort-int4", work / "first", progress=stages)
        fresh = {"wall_seconds": round(time.perf_counter() - started, 1), "stages": stages.seconds,
                 "ppl_32_windows": first.metrics["quantized"]["ppl"], "float_ppl_32_windows": first.metrics["float"]["ppl"]}
        print("fresh qcompile model:", fresh, flush=True)

        started = time.perf_counter()
        arts = qcompile.compile_many("smollm2-135m", TARGETS, work / "defaults", eval_windows=None)
        many_seconds = round(time.perf_counter() - started, 1)
        report = qcompile.verify_all([arts[t].path for t in TARGETS])
        print("verify_all passed:", report["passed"], flush=True)

        started = time.perf_counter()
        rows = {"float (ORT fp32)": qcompile.export("smollm2-135m"), PEER: build_genai(work)}
        builder_seconds = round(time.perf_counter() - started, 1)
        rows.update({f"qcompile {t}": arts[t].path for t in TARGETS})

        tokenizer = runtime.load_tokenizer(rows["float (ORT fp32)"])
        results = {}
        for name, folder in rows.items():
            ppl = evaluation.perplexity(runtime.Decoder(folder), tokenizer, args.windows).ppl
            results[name] = {"perplexity": round(ppl, 3), "size_mb": round(artifact.model_bytes(folder / "model.onnx") / 1e6, 1)}
            print(name, results[name], flush=True)
        decoders = {name: runtime.Decoder(folder) for name, folder in rows.items()}
        for r in results.values():
            r.update({"prefill_512_ms": float("inf"), **{f"decode_ms_p{p}": float("inf") for p in PROMPTS}})
        for _ in range(args.rounds):  # interleaved, so that machine noise hits every model alike
            for name, decoder in decoders.items():
                r = results[name]
                r["prefill_512_ms"] = min(r["prefill_512_ms"], evaluation.latency(decoder, prompt_len=512, decode_steps=1, rounds=1)["prefill_ms"])
                for p in PROMPTS:
                    ms = evaluation.latency(decoder, prompt_len=p, decode_steps=32, rounds=1)["decode_ms_per_token"]
                    r[f"decode_ms_p{p}"] = min(r[f"decode_ms_p{p}"], ms)

    float_ppl, peer = results["float (ORT fp32)"]["perplexity"], results[PEER]
    for r in results.values():
        r["ppl_increase_pct"] = round(100 * (r["perplexity"] / float_ppl - 1), 2)
        r.update({f"decode_ratio_p{p}": round(r[f"decode_ms_p{p}"] / peer[f"decode_ms_p{p}"], 3) for p in PROMPTS})
        r["size_ratio"] = round(r["size_mb"] / peer["size_mb"], 3)
    lines = [f"SmolLM2-135M, perplexity on {args.windows} windows; ratios are to the builder's.", "",
             "| model | perplexity | Δ vs float | size MB | size ratio | prefill 512 ms | decode ms/tok p128 | ratio | decode ms/tok p1024 | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['perplexity']:.2f} | {r['ppl_increase_pct']:+.2f} % | {r['size_mb']:.0f} | {r['size_ratio']:.2f}× | "
              f"{r['prefill_512_ms']:.0f} | {r['decode_ms_p128']:.1f} | {r['decode_ratio_p128']:.2f}× | {r['decode_ms_p1024']:.1f} | "
              f"{r['decode_ratio_p1024']:.2f}× |" for name, r in results.items()]
    lines += ["", f"Fresh `qcompile model` (export, quantization, evaluation on 32 windows): {fresh['wall_seconds']} s; stages (s): "
              + ", ".join(f"{k} {v}" for k, v in fresh["stages"].items()),
              f"`compile_many` of {', '.join(TARGETS)} (export cached, no evaluation): {many_seconds} s; verify across them: "
              f"{'passed' if report['passed'] else 'FAILED'}. The builder took {builder_seconds} s (HF folder from the GGUF included)."]
    save("defaults", {**meta(windows=args.windows, rounds=args.rounds), "fresh_compile": fresh, "compile_many_seconds": many_seconds,
                      "verify_passed": report["passed"], "builder_seconds": builder_seconds, "rows": results}, lines)


if __name__ == "__main__":
    main()
