"""Where a decode step's time goes: qcompile's default ort-int4 against onnxruntime-genai's builder, per op type.

    python benchmarks/bench_decode_profile.py [--steps 32] [--rounds 5] [--keep DIR]

Both models are decoded by qcompile's runtime (`Decoder.sequence`, the cache appended in place) after a 128- and a
1024-token prompt (WikiText-2 test text). For each: ONNX Runtime's profile of `--steps` greedy steps (the mean
step's `model_run` time and its kernel time summed by op type, the first two steps left out), then decode
ms/token interleaved across the models (median of 48 steps a round, best of --rounds). The builder's model is
`-p int4 -e cpu` on an HF folder saved from the same GGUF (`bench_decode_peers.build_genai`); ours is
`qcompile model` with its defaults, without evaluation. `--keep DIR` builds both there once and reuses them.
Writes benchmarks/results/decode_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics
import tempfile
import time

import onnxruntime as ort

import qcompile
from qcompile import evaluation, runtime
from _results import meta, save
from bench_decode_peers import build_genai

PROMPTS = (128, 1024)
PEER = "onnxruntime-genai builder int4"
OURS = "qcompile ort-int4"


def profile(folder: pathlib.Path, ids: list[int], prompt: int, steps: int, prefix: pathlib.Path) -> dict:
    """One prompt and `steps` greedy steps under ORT's profiler: the mean decode step's model_run µs and kernel µs by op type."""
    decoder = runtime.Decoder(folder)
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix, options.log_severity_level = True, str(prefix), 3
    decoder.session = ort.InferenceSession(str(decoder.path), options, providers=["CPUExecutionProvider"])
    sequence = decoder.sequence(prompt + steps + 1)
    token = int(sequence.prefill(ids[:prompt]).argmax())
    for _ in range(steps):
        token = int(sequence.step(token).argmax())
    events = json.loads(pathlib.Path(decoder.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][-(steps - 2):]  # the decode steps, less the first two
    kernels = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= runs[0]["ts"] and e["name"].endswith("_kernel_time"):
            kernels[e["args"]["op_name"]] += e["dur"]
    return {"model_run_us": round(sum(r["dur"] for r in runs) / len(runs)),
            "kernel_us": {op: round(us / len(runs)) for op, us in kernels.most_common()}}


def timing(decoders: dict[str, runtime.Decoder], ids: list[int], prompt: int, rounds: int, steps: int = 48) -> dict[str, float]:
    """Decode ms/token after `prompt` tokens, rounds interleaved across the models, best round's median step each."""
    best = {name: float("inf") for name in decoders}
    for _ in range(rounds):
        for name, decoder in decoders.items():
            sequence = decoder.sequence(prompt + steps + 1)
            token, times = int(sequence.prefill(ids[:prompt]).argmax()), []
            for _ in range(steps):
                started = time.perf_counter()
                token = int(sequence.step(token).argmax())
                times.append(time.perf_counter() - started)
            best[name] = min(best[name], 1e3 * statistics.median(times))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", type=pathlib.Path, help="build the two models here once and reuse them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-profile-") as tmp:
        work = args.keep or pathlib.Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        peer = work / "genai-int4" if (work / "genai-int4" / "model.onnx").is_file() else build_genai(work)
        ours = work / "ort-int4"
        if not (ours / "model.onnx").is_file():
            qcompile.compile("smollm2-135m", "ort-int4", ours, eval_windows=None)
        folders = {PEER: peer, OURS: ours}
        ids = runtime.load_tokenizer(ours).encode(evaluation.wikitext("test")[: max(PROMPTS) * 8]).ids
        profiles = {f"{name} p{p}": profile(folder, ids, p, args.steps, pathlib.Path(tmp) / "profile")
                    for p in PROMPTS for name, folder in folders.items()}
        decoders = {name: runtime.Decoder(folder) for name, folder in folders.items()}
        times = {p: timing(decoders, ids, p, args.rounds) for p in PROMPTS}

    totals = collections.Counter()
    for entry in profiles.values():
        totals.update(entry["kernel_us"])
    ops = [op for op, _ in totals.most_common(8)]
    lines = ["SmolLM2-135M, decode step after a prompt of 128 or 1024 tokens; ONNX Runtime profile, µs per step "
             f"(mean of {args.steps - 2} steps), and ms/token interleaved (best of {args.rounds} rounds).", "",
             "| model | prompt | ms/token | ratio | model_run µs | " + " | ".join(ops) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(ops)]
    for p in PROMPTS:
        for name in folders:
            entry = profiles[f"{name} p{p}"]
            lines.append(f"| {name} | {p} | {times[p][name]:.2f} | {times[p][name] / times[p][PEER]:.3f}× | {entry['model_run_us']} | "
                         + " | ".join(str(entry["kernel_us"].get(op, "")) for op in ops) + " |")
    save("decode_profile", {**meta(steps=args.steps, rounds=args.rounds), "profiles": profiles,
                            "decode_ms": {str(p): times[p] for p in PROMPTS}}, lines)


if __name__ == "__main__":
    main()
