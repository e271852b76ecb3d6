"""A quantized KV cache on SmolLM2-135M, in one run: float, int8 and int4 caches, rotated and not.

    python benchmarks/bench_kv_cache.py [--windows 128] [--prompts 1024 4096 8128] [--steps 32]

Every row is `qcompile.compile(..., "ort-int4", lm_head_bits=8, kv_cache_bits=...)` with RTN weights, or
rotated GPTQ weights (`rotate=True`: QuaRot's rotations, the keys rotated before they are cached; RTN after
a rotation scored far worse on SmolLM2: +156 % on 8 windows against +34 % unrotated, likely because its
weights sit on a 4-bit grid that a rotation scatters), so the cache is the only difference between rows of
one weight recipe. For each: perplexity on --windows windows and the increase
over the same model with a float cache. For the unrotated rows, each prompt length in its own process:
the cache's allocated bytes (`Sequence` buffers for prompt + steps tokens), the process's resident memory
after loading, after the prompt (chunked prefill) and its peak, and decode ms/token (median of --steps
greedy steps after the prompt). Writes benchmarks/results/kv_cache.{json,md}.

onnxruntime-genai's builder's quantized cache (a separate calibrate-and-rebuild cycle) is not part of
this run.
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

ROWS = {  # name: (weight algorithm, rotate, KV-cache bits)
    "float cache": ("rtn", False, None), "int8 cache": ("rtn", False, 8), "int4 cache": ("rtn", False, 4),
    "rotated GPTQ, float cache": ("gptq", True, None), "rotated GPTQ, int4 cache": ("gptq", True, 4),
}
LATENCY_ROWS = ("float cache", "int8 cache", "int4 cache")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 8128])
    parser.add_argument("--steps", type=int, default=32)
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
    for i, (name, (algo, rotate, bits)) in enumerate(ROWS.items()):
        folder = work / f"row{i}"
        started = time.perf_counter()
        if not (folder / "manifest.json").is_file():
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
        base = rows["rotated GPTQ, float cache" if name.startswith("rotated") else "float cache"]["perplexity"]
        r["ppl_increase_pct"] = round(100 * (r["perplexity"] / base - 1), 2)
    for name in LATENCY_ROWS:
        rows[name]["latency"] = []
        for prompt in args.prompts:
            out = subprocess.run([sys.executable, __file__, "--measure", rows[name]["folder"], str(prompt), str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            rows[name]["latency"].append(json.loads(out.strip().splitlines()[-1]))
            print(name, rows[name]["latency"][-1], flush=True)

    lines = [f"SmolLM2-135M, ort-int4 RTN weights (lm_head int8); perplexity on {args.windows} windows; "
             f"latency: one process per prompt, {args.steps} greedy steps", "",
             "| cache | perplexity | vs float cache |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f} % |" for name, r in rows.items()]
    lines += ["", "| cache | prompt | KV bytes/token | cache MB | RSS growth after prompt MB | peak RSS growth MB | "
              "decode ms/token | vs float |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in LATENCY_ROWS:
        for m, f in zip(rows[name]["latency"], rows["float cache"]["latency"]):
            lines.append(f"| {name} | {m['prompt']} | {m['kv_bytes_per_token']} | {m['cache_mb']} | "
                         f"{m['rss_growth_after_prompt_mb']} | {m['rss_peak_growth_mb']} | {m['decode_ms']:.2f} | "
                         f"{m['decode_ms'] / f['decode_ms']:.2f}× |")
    save("kv_cache", {**meta(windows=args.windows, source="smollm2-135m"),
                      "rows": rows}, lines)


if __name__ == "__main__":
    main()
