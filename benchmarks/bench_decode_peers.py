"""Decode speed against the strongest CPU peer, onnxruntime-genai's model builder, in one run.

    python benchmarks/bench_decode_peers.py [--windows 128] [--rounds 5]

Rows: the float export (ORT fp32), and the same with qcompile's ORT fusions; onnxruntime-genai's builder int4 for CPU (its defaults: block 32,
accuracy_level 4, fused QKV, GroupQueryAttention, int4 lm_head tied to a GatherBlockQuantized embedding),
built from a local HF folder saved from the same GGUF weights; qcompile ort-int4 (its defaults: RTN g128,
lm_head 4-bit GPTQ g32, fused), the same with --no-fuse, with an 8-bit lm_head (the default before), and with a
4-bit embedding table too;
qcompile ort-w8a8, fused and not (for its decode speed against FP32); qcompile ort-w4a8 rotated and not (for
its decode speed against FP32 and the online Hadamards' cost). Each row: size, perplexity (pinned protocol, same
tokenizer), prefill-512 ms, decode ms/token after a 128- and a 1024-token prompt (rounds interleaved
across rows, best round each), peak RSS of a process that loads the model and decodes at 1024 context,
and the physical floor: the weight bytes a decode step reads / this machine's measured memory bandwidth.
Every row decodes through qcompile's runtime (`Decoder.sequence`: where GroupQueryAttention writes the
cache, the builder's model included, past and present are one buffer appended in place); one more row
decodes the builder's model with onnxruntime-genai's own generator, its real client.
Writes benchmarks/results/decode_peers.{json,md}.
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
from qcompile import artifact, evaluation, runtime, sources
from _results import meta, save

PROMPTS = (128, 1024)
PEER = "onnxruntime-genai builder int4"
PEER_NATIVE = "onnxruntime-genai builder int4, decoded by onnxruntime-genai's generator"
VARIANTS = {  # qcompile rows: (target, compile() options)
    "qcompile ort-int4": ("ort-int4", {}),
    "qcompile ort-int4 --no-fuse": ("ort-int4", {"fuse": False}),
    "qcompile ort-int4 --lm-head int8": ("ort-int4", {"lm_head_bits": 8}),
    "qcompile ort-int4 --embeddings int4": ("ort-int4", {"embedding_bits": 4}),
    "qcompile ort-w8a8": ("ort-w8a8", {}),
    "qcompile ort-w8a8 --no-fuse": ("ort-w8a8", {"fuse": False}),
    # QuaRot's W4A8 and the same GPTQ weights unrotated: the online Hadamards' decode cost (calibrated on
    # 32 windows to keep the run short)
    "qcompile ort-w4a8 --calib-samples 32": ("ort-w4a8", {"calib_samples": 32}),
    "qcompile ort-w4a8 --no-rotate --calib-samples 32": ("ort-w4a8", {"rotate": False, "calib_samples": 32}),
}


def build_genai(work: pathlib.Path, extra_options: str | None = None, name: str = "genai-int4") -> pathlib.Path:
    """onnxruntime-genai's builder, int4 CPU (with its `--extra_options`, space-separated key=value pairs, e.g.
    int4_algo_config=k_quant_mixed), on an HF folder saved from the built-in GGUF model (saved once per `work`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = sources.resolve("smollm2-135m").path
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.config.quantization_config = None  # the GGUF loader's marker: the weights are plain fp32 now
        model.hf_quantizer, model.is_quantized = None, False
        model.save_pretrained(hf)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
        config = json.loads((hf / "config.json").read_text())
        config.pop("quantization_config", None)  # the builder reads a null one as a quantized checkpoint
        (hf / "config.json").write_text(json.dumps(config, indent=2))
        del model
    out = work / name
    started = time.perf_counter()
    extra = ["--extra_options", *extra_options.split()] if extra_options else []
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                          "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache"), *extra], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"onnxruntime-genai's builder failed: {run.stderr[-2000:]}")
    print(f"genai builder: {time.perf_counter() - started:.0f} s")
    return out


def fuse_float(float_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The float export with the ORT targets' fusions only (the fair FP32 baseline for fused graphs)."""
    import onnx_ir as ir

    from qcompile.passes import FuseGroupQueryAttention
    from qcompile.targets.ort import FuseNormalizations

    model = ir.load(float_dir / "model.onnx")
    FuseGroupQueryAttention(json.loads((float_dir / "config.json").read_text())["max_position_embeddings"])(model)
    FuseNormalizations()(model)
    out.mkdir()
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    return out


def weight_bytes_per_token(model_path: pathlib.Path) -> int:
    """Bytes of every initializer a decode step reads: all of them except an embedding table read only by
    a Gather (one row per token)."""
    import onnx_ir as ir

    model = ir.load(model_path)
    total = 0
    for value in model.graph.initializers.values():
        users = {use.node.op_type for use in value.uses()}
        if users and users <= {"Gather", "GatherBlockQuantized"} and value.const_value.size > 1_000_000:
            continue
        total += value.const_value.nbytes
    return total


def memory_bandwidth_gbs() -> float:
    """Best of 5 copies of a 1 GiB array (read + write bytes per second)."""
    a = np.ones(1 << 28, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return round(2 * a.nbytes / best / 1e9, 2)


def peak_rss_mb(path: pathlib.Path) -> float:
    """Peak RSS of a fresh process that loads `path` and decodes 8 tokens after a 1024-token prompt."""
    code = (
        "import numpy as np\n"
        "from qcompile import runtime\n"
        f"d = runtime.Decoder({str(path)!r})\n"
        "ids = np.random.default_rng(0).integers(100, 1000, size=(1, 1024))\n"
        "s = d.sequence(1032)\n"
        "logits = s.prefill(ids[0])\n"
        "for i in range(8):\n"
        "    logits = s.step(int(logits.argmax()))\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
    )  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across exec
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return round(int(out.stdout.split()[-1]) / 1024, 0)


def genai_decode_ms(generator_model, prompt_len: int, steps: int = 32) -> float:
    """Median ms per token of onnxruntime-genai's own generator (greedy) after a `prompt_len` prompt."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(generator_model)
    params.set_search_options(max_length=prompt_len + steps + 1, do_sample=False)
    generator = og.Generator(generator_model, params)
    generator.append_tokens(np.random.default_rng(0).integers(100, 1000, size=(1, prompt_len)).astype(np.int32))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qcompile-bench-decode-") as tmp:
        work = pathlib.Path(tmp)
        float_dir = qcompile.export("smollm2-135m")
        rows = {"float (ORT fp32)": float_dir, "float fused (ORT fp32)": fuse_float(float_dir, work / "float-fused"),
                PEER: build_genai(work)}
        for name, (target, options) in VARIANTS.items():
            started = time.perf_counter()
            qcompile.compile(float_dir, target, work / name.replace(" ", "_"), eval_windows=None, **options)
            print(f"{name}: compiled in {time.perf_counter() - started:.0f} s")
            rows[name] = work / name.replace(" ", "_")

        tokenizer = runtime.load_tokenizer(float_dir)
        bandwidth = memory_bandwidth_gbs()
        results = {}
        for name, folder in rows.items():
            decoder = runtime.Decoder(folder)
            ppl = evaluation.perplexity(decoder, tokenizer, args.windows).ppl
            weights = weight_bytes_per_token(folder / "model.onnx")
            results[name] = {"size_mb": round(artifact.model_bytes(folder / "model.onnx") / 1e6, 1), "perplexity": round(ppl, 3), "peak_rss_mb": peak_rss_mb(folder / "model.onnx"),
                             "weight_mb_per_token": round(weights / 1e6, 1),
                             "floor_ms_per_token": round(1000 * weights / (bandwidth * 1e9), 2)}
            print(name, results[name], flush=True)
            del decoder

        import onnxruntime_genai as og

        decoders = {name: runtime.Decoder(folder) for name, folder in rows.items()}
        best = {name: {"prefill_512_ms": float("inf"), **{f"decode_ms_p{p}": float("inf") for p in PROMPTS}} for name in rows}
        genai_model = og.Model(str(rows[PEER]))
        native = {p: float("inf") for p in PROMPTS}
        for _ in range(args.rounds):  # interleaved, so that machine noise hits every row alike
            for p in PROMPTS:
                native[p] = min(native[p], genai_decode_ms(genai_model, p))
            for name, decoder in decoders.items():
                r = evaluation.latency(decoder, prompt_len=512, decode_steps=1, rounds=1)
                best[name]["prefill_512_ms"] = min(best[name]["prefill_512_ms"], r["prefill_ms"])
                for p in PROMPTS:
                    r = evaluation.latency(decoder, prompt_len=p, decode_steps=32, rounds=1)
                    best[name][f"decode_ms_p{p}"] = min(best[name][f"decode_ms_p{p}"], r["decode_ms_per_token"])
        for name in rows:
            results[name].update(best[name])
        results[PEER_NATIVE] = {f"decode_ms_p{p}": round(native[p], 2) for p in PROMPTS}

    float_ppl = results["float (ORT fp32)"]["perplexity"]
    peer = results[PEER]
    lines = [f"Memory bandwidth (numpy copy, read + write): {bandwidth} GB/s. Decode ratio: ms/token over the "
             f"genai builder's at the same prompt length. Perplexity: {args.windows} windows.", "",
             "| model | size MB | perplexity | Δ vs float | prefill 512 ms | decode ms/tok p128 | ratio | decode ms/tok p1024 | ratio | peak RSS MB | weights read MB/tok | floor ms/tok |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        ratios = [r[f"decode_ms_p{p}"] / peer[f"decode_ms_p{p}"] for p in PROMPTS]
        r.update({f"decode_ratio_p{p}": round(x, 3) for p, x in zip(PROMPTS, ratios)})
        if name == PEER_NATIVE:
            lines.append(f"| {name} | – | – | – | – | {r['decode_ms_p128']:.1f} | {ratios[0]:.3f}× | {r['decode_ms_p1024']:.1f} | "
                         f"{ratios[1]:.3f}× | – | – | – |")
            continue
        lines.append(f"| {name} | {r['size_mb']:.0f} | {r['perplexity']:.2f} | {100 * (r['perplexity'] / float_ppl - 1):+.2f} % | "
                     f"{r['prefill_512_ms']:.0f} | {r['decode_ms_p128']:.1f} | {ratios[0]:.3f}× | {r['decode_ms_p1024']:.1f} | "
                     f"{ratios[1]:.3f}× | {r['peak_rss_mb']:.0f} | {r['weight_mb_per_token']:.0f} | {r['floor_ms_per_token']:.1f} |")
    save("decode_peers", {**meta(windows=args.windows, rounds=args.rounds), "bandwidth_gbs": bandwidth, "rows": results}, lines)


if __name__ == "__main__":
    main()
