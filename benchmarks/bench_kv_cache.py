"""A quantized KV cache on SmolLM2-135M, in one run: float, int8 and int4 caches, rotated and not.

    python benchmarks/bench_kv_cache.py [--windows 128] [--prompts 1024 4096 8128] [--steps 32] [--long 8192]

Every row is `qcompile.compile(..., "ort-int4", lm_head_bits=8, kv_cache_bits=...)` with RTN weights, or
rotated GPTQ weights (`rotate=True`: QuaRot's rotations, the keys rotated before they are cached; RTN after
a rotation scored far worse on SmolLM2: +156 % on 8 windows against +34 % unrotated, likely because its
weights sit on a 4-bit grid that a rotation scatters), so the cache is the only difference between rows of
one weight recipe. For each: perplexity on --windows windows and the increase
over the same model with a float cache. For the unrotated rows, each prompt length in its own process:
the cache's allocated bytes (`Sequence` buffers for prompt + steps tokens), the process's resident memory
after loading, after the prompt (chunked prefill) and its peak, and decode ms/token (median of --steps
greedy steps after the prompt). Then every row's perplexity by position in one --long-token sequence (the
calibration windows are 512 tokens: later positions are where a cache's scales were never measured). Writes
benchmarks/results/kv_cache.{json,md}.

The peer, onnxruntime-genai's builder (int4 CPU, on an HF folder saved from the same GGUF): its float cache,
and its quantized caches as its documented calibrate-and-rebuild cycle makes them: `kv_cache_calibration`
on the builder's float-cache model (its defaults: 24 sequences of 512 tokens, per channel, the 99.99th
percentile of |x|, keys by their RoPE pair envelope; the text is WikiText-2 valid, which qcompile calibrates
on), then a rebuild with `kv_cache_quant_scheme=int8_per_channel|int4_per_channel kv_cache_scale_file=…`;
int4 also with its `mse` method. Its rows are evaluated and timed by the same code as qcompile's, and
compared with the builder's own float cache.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

import qcompile
from qcompile import evaluation, runtime
from _results import meta, save
from bench_decode_peers import build_genai

ROWS = {  # name: (weight algorithm, rotate, KV-cache bits)
    "float cache": ("rtn", False, None), "int8 cache": ("rtn", False, 8), "int4 cache": ("rtn", False, 4),
    "rotated GPTQ, float cache": ("gptq", True, None), "rotated GPTQ, int4 cache": ("gptq", True, 4),
}
PEER_ROWS = {  # name: (the builder's kv_cache_quant_scheme, its calibration method)
    "builder, float cache": (None, None), "builder, int8 cache": ("int8_per_channel", "percentile"),
    "builder, int4 cache": ("int4_per_channel", "percentile"), "builder, int4 cache (mse)": ("int4_per_channel", "mse"),
}
LATENCY_ROWS = ("float cache", "int8 cache", "int4 cache", "builder, float cache", "builder, int8 cache", "builder, int4 cache")


def baseline(name: str) -> str:
    """The float-cache row `name` is compared with: the same weights."""
    return ("builder, float cache" if name.startswith("builder") else
            "rotated GPTQ, float cache" if name.startswith("rotated") else "float cache")


def build_peer(work: pathlib.Path, scheme: str | None, method: str | None) -> pathlib.Path:
    """The builder's int4 CPU model with a float cache (scheme None) or with its quantized cache: scales from its
    calibration tool run on the float-cache model, then a rebuild (module docstring). Built once per `work`."""
    from onnxruntime_genai.models.quantization.kv_cache_calibration import calibrate_kv_scales

    base = work / "genai-int4"
    if not (base / "model.onnx").is_file():
        build_genai(work)
    if scheme is None:
        return base
    name = f"genai-{scheme}-{method}"
    if not (work / name / "model.onnx").is_file():
        scales = work / f"{name}.json"
        passages = [p for p in evaluation.wikitext("valid").split("\n\n") if p.strip()]
        calibrate_kv_scales(str(base / "model.onnx"), str(work / "hf"), str(scales), quant_type=scheme, method=method,
                            corpus=passages)
        build_genai(work, f"kv_cache_quant_scheme={scheme} kv_cache_scale_file={scales}", name=name)
    return work / name


def _memory_mb() -> tuple[float, float]:
    """(resident, peak resident) of this process in MB."""
    status = dict(line.split(":", 1) for line in pathlib.Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def measure(folder: pathlib.Path, prompt: int, steps: int) -> dict:
    """One sequence of `prompt` tokens (WikiText-2 test text) and `steps` greedy steps, in this process."""
    decoder = runtime.Decoder(folder)
    ids = runtime.load_tokenizer(folder).encode(evaluation.wikitext("test")[: prompt * 8]).ids[:prompt]
    loaded, _ = _memory_mb()
    sequence = decoder.sequence(prompt + steps + 1)
    started = time.perf_counter()
    logits = sequence.prefill(ids)
    prefill_s = time.perf_counter() - started
    after_prompt, _ = _memory_mb()
    token, times = int(logits.argmax()), []
    for _ in range(steps + 1):
        started = time.perf_counter()
        token = int(sequence.step(token).argmax())
        times.append(time.perf_counter() - started)
    resident, peak = _memory_mb()
    cache = sum(b.nbytes for b in sequence.buffers.values())
    return {"prompt": prompt, "cache_mb": round(cache / 1e6, 1), "kv_bytes_per_token": cache // sequence.capacity,
            "rss_loaded_mb": round(loaded), "rss_growth_after_prompt_mb": round(after_prompt - loaded),
            "rss_growth_end_mb": round(resident - loaded), "rss_peak_growth_mb": round(peak - loaded),
            "prefill_s": round(prefill_s, 1), "decode_ms": round(1e3 * float(np.median(times[1:])), 2)}


BUCKETS = (0, 512, 1024, 2048, 4096, 8192)  # position ranges of the long-context table


def long_nll(folder: pathlib.Path, length: int) -> list[float]:
    """Mean NLL (nats) of the next token per position range of BUCKETS in the first `length` + 1 tokens of WikiText-2
    test as one sequence (`evaluation.position_nll`, 512-token chunks into the cache)."""
    decoder = runtime.Decoder(folder)
    ids = np.asarray(evaluation.leading_ids(runtime.load_tokenizer(folder), evaluation.wikitext("test"), length + 1))
    nll = evaluation.position_nll(decoder, ids[:length + 1])
    return [round(float(nll[a:b].mean()), 4) for a, b in zip(BUCKETS, BUCKETS[1:]) if b <= length]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 8128])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--long", type=int, default=8192, help="tokens of the long-context sequence (0: skip that table)")
    parser.add_argument("--keep", type=pathlib.Path, help="compile into this folder (a rerun reuses its rows and perplexities)")
    parser.add_argument("--measure", nargs=3, metavar=("FOLDER", "PROMPT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(pathlib.Path(args.measure[0]), int(args.measure[1]), int(args.measure[2]))))
        return

    work = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="qcompile-bench-kv-"))
    float_dir = qcompile.export("smollm2-135m")
    tokenizer = runtime.load_tokenizer(float_dir)
    rows: dict[str, dict] = {}
    for i, name in enumerate([*ROWS, *PEER_ROWS]):
        folder = work / f"row{i}"
        started = time.perf_counter()
        if name in PEER_ROWS:
            folder = build_peer(work, *PEER_ROWS[name])
        elif not (folder / "manifest.json").is_file():
            algo, rotate, bits = ROWS[name]
            rotation = {"rotate": True, "attention_hadamards": True} if rotate else {}  # the same rotations with any cache
            qcompile.compile("smollm2-135m", "ort-int4", folder, eval_windows=None, algo=algo, lm_head_bits=8,
                             kv_cache_bits=bits, **rotation)
        saved = folder / f"bench-perplexity-{args.windows}.json"  # a rerun with --keep reuses it
        if not saved.is_file():
            saved.write_text(json.dumps(evaluation.perplexity(runtime.Decoder(folder), tokenizer, args.windows).ppl))
        ppl = json.loads(saved.read_text())
        rows[name] = {"folder": str(folder), "compile_s": round(time.perf_counter() - started, 1), "perplexity": round(ppl, 3)}
        print(name, rows[name], flush=True)
    for name, r in rows.items():
        r["ppl_increase_pct"] = round(100 * (r["perplexity"] / rows[baseline(name)]["perplexity"] - 1), 2)
    for name, r in rows.items() if args.long else ():
        saved = pathlib.Path(r["folder"]) / f"bench-long-{args.long}.json"
        if not saved.is_file():
            saved.write_text(json.dumps(long_nll(pathlib.Path(r["folder"]), args.long)))
        r["long_nll"] = json.loads(saved.read_text())
        print(name, "NLL by position", r["long_nll"], flush=True)
    for name in LATENCY_ROWS:
        rows[name]["latency"] = []
        for prompt in args.prompts:
            out = subprocess.run([sys.executable, __file__, "--measure", rows[name]["folder"], str(prompt), str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            rows[name]["latency"].append(json.loads(out.strip().splitlines()[-1]))
            print(name, rows[name]["latency"][-1], flush=True)

    lines = [f"SmolLM2-135M, ort-int4 RTN weights (lm_head int8), rotated GPTQ weights, and the builder's int4 model; "
             f"perplexity on {args.windows} windows, against the same weights with a float cache; "
             f"latency: one process per prompt, {args.steps} greedy steps", "",
             "| cache | perplexity | vs float cache |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f} % |" for name, r in rows.items()]
    if args.long:
        spans = [f"{a}–{b}" for a, b in zip(BUCKETS, BUCKETS[1:]) if b <= args.long]
        lines += ["", f"Perplexity by position in one {args.long}-token WikiText-2 test sequence (512-token chunks into the cache), "
                  "and its increase over the same weights with a float cache", "",
                  "| cache | " + " | ".join(spans) + " |", "|---|" + "---:|" * len(spans)]
        for name, r in rows.items():
            base = rows[baseline(name)]["long_nll"]
            lines.append(f"| {name} | " + " | ".join(f"{np.exp(x):.2f} ({100 * (np.exp(x - b) - 1):+.1f} %)"
                                                     for x, b in zip(r["long_nll"], base)) + " |")
    lines += ["", "| cache | prompt | KV bytes/token | cache MB | RSS growth after prompt MB | peak RSS growth MB | "
              "decode ms/token | vs float |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in LATENCY_ROWS:
        for m, f in zip(rows[name]["latency"], rows[baseline(name)]["latency"]):
            lines.append(f"| {name} | {m['prompt']} | {m['kv_bytes_per_token']} | {m['cache_mb']} | "
                         f"{m['rss_growth_after_prompt_mb']} | {m['rss_peak_growth_mb']} | {m['decode_ms']:.2f} | "
                         f"{m['decode_ms'] / f['decode_ms']:.2f}× |")
    save("kv_cache", {**meta(windows=args.windows, source="smollm2-135m"),
                      "rows": rows}, lines)


if __name__ == "__main__":
    main()
