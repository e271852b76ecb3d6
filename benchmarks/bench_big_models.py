"""Streaming compiles of big models: wall time and peak RSS of export and quantization against model size.

    python benchmarks/bench_big_models.py [--sizes 135m 1b 3b 8b] [--stages export rtn run trt gptq gptq-blocks]
                                          [--calib-samples 8] [--work DIR]

Each size is a randomly initialised bf16 Llama written as a sharded safetensors checkpoint one tensor at a
time (the model is never built in memory): shaped like SmolLM2-135M, Llama-3.2-1B and Llama-3.2-3B (SmolLM2's
vocabulary of 49,152 tokens, tied embeddings) and Llama-3.1-8B (vocabulary 128,256, untied), with SmolLM2's
tokenizer so the calibration text tokenizes. Each stage is its own process under `/usr/bin/time -v`:

    export       qcompile export <hf folder> -o <export>                            # fp32 ONNX, external data
    rtn          qcompile model <export> --target ort-int4 --algo rtn --lm-head int8 --no-eval   # uncalibrated
    run          qcompile run <the rtn artifact> -p "The capital of France is" -n 8
    trt          qcompile model <export> --target trt-int4 --algo rtn --lm-head int8 --no-eval
    gptq         qcompile model <export> --target ort-int4 --algo gptq --calib-samples N --no-eval
    gptq-blocks  the same with --lm-head int8, stopped after two blocks: time to the first block, time per
                 block, peak RSS, and the whole compile projected from them

and the table reports wall time and peak RSS (maximum resident set) against the float weight bytes (the
export's model.onnx.data). GPTQ calibrates on N windows of 512 tokens (default 8).
Rows accumulate across runs (one size, or one stage, per invocation is fine): with `--work DIR` the random
model and its export are kept in DIR/<size>/, so a later invocation can run only some stages on them;
a run that includes `export` builds a new model and starts that size's row afresh.
Writes benchmarks/results/big_models.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import qcompile
from qcompile import artifact
from _results import RESULTS, meta, save

SIZES = {  # LlamaConfig fields: SmolLM2-135M, Llama-3.2-1B and -3B (tied embeddings, SmolLM2's vocabulary), Llama-3.1-8B
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=49152, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               vocab_size=49152, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
NAME = "big_models"
SHARD_BYTES = 2 << 30


def build_hf(size: str, folder: pathlib.Path) -> int:
    """A random bf16 Llama of `size` written as a sharded HF folder (safetensors shards of about 2 GiB and their
    index) with SmolLM2's tokenizer, one shard at a time: the model is never built. Returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{"max_position_embeddings": 2048, "rope_theta": 100000.0, "bos_token_id": 1, "eos_token_id": 2,
                            **SIZES[size]})
    with torch.device("meta"):
        shapes = [(name, tuple(p.shape)) for name, p in LlamaForCausalLM(config).named_parameters()]  # tied: once
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict = {}

    def write() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in shapes:
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > SHARD_BYTES:
            write()
        shard[name] = tensor
    write()
    params = sum(math.prod(s) for _, s in shapes)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * params}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    tokenizer = qcompile.export("smollm2-135m")  # cached after the first run
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, folder / name)
    return params


def timed(args: list[str]) -> dict:
    """Run `qcompile args` under /usr/bin/time -v: wall seconds and peak RSS bytes."""
    run = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "qcompile", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"qcompile {' '.join(args)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", run.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return {"seconds": round(seconds, 1), "peak_rss_bytes": rss}


UNCALIBRATED = ["--algo", "rtn", "--lm-head", "int8"]
STAGES = {"rtn": ("ort-int4 rtn", ["--target", "ort-int4", *UNCALIBRATED]),
          "trt": ("trt-int4 rtn", ["--target", "trt-int4", *UNCALIBRATED]),
          "gptq": ("ort-int4 gptq", ["--target", "ort-int4", "--algo", "gptq"])}
PROMPT = "The capital of France is"


def gptq_blocks(exported: pathlib.Path, out: pathlib.Path, calib_samples: int, blocks: int = 2) -> dict:
    """Start `ort-int4 --algo gptq` and stop it once `blocks` blocks are quantized (the resumable state saves
    each quantized linear as a file): seconds until the first block is done, seconds per block after it, peak
    RSS, and the projected total (first block, then one block's time per remaining block and for lm_head)."""
    layers = json.loads((exported.parent / "config.json").read_text())["num_hidden_layers"]
    state = out.parent / f".{out.name}.qcompile-state"
    args = ["model", str(exported), "--target", "ort-int4", "--algo", "gptq", "--lm-head", "int8",
            "--calib-samples", str(calib_samples), "--no-eval", "-o", str(out)]
    started = time.time()
    proc = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, "-m", "qcompile", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    per_block = 7  # q, k, v, o, gate, up, down: saved as blocks.<i>.<role>.npz
    while proc.poll() is None:
        done = sorted(p.stat().st_mtime for p in state.glob("blocks.*.npz")) if state.is_dir() else []
        if len(done) >= blocks * per_block:
            # the compile, not /usr/bin/time (which still reports); Ctrl-C waits for ORT's current run to end
            subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)])
            break
        time.sleep(1)
    stderr = proc.communicate()[1]
    shutil.rmtree(state, ignore_errors=True)
    if len(done) < blocks * per_block:
        raise SystemExit(f"the GPTQ compile ended before {blocks} blocks:\n{stderr[-3000:]}")
    first = done[per_block - 1] - started
    block = (done[blocks * per_block - 1] - done[per_block - 1]) / (blocks - 1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1)) * 1024
    return {"seconds_to_first_block": round(first, 1), "seconds_per_block": round(block, 1), "blocks_run": blocks,
            "projected_total_seconds": round(first + block * layers), "peak_rss_bytes": rss,
            "seconds": round(first + block * (blocks - 1), 1)}


def run_size(size: str, work: pathlib.Path, stages: list[str], calib_samples: int, row: dict | None) -> dict:
    """Measure `stages` of `size` in `work`; `row` holds earlier stages of the same size (kept in `work`)."""
    hf, exported = work / "hf", work / "export"
    if "export" in stages or row is None or not (exported / "model.onnx").is_file():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        row = {"size": size, "params": build_hf(size, hf), "config": SIZES[size], "stages": {}}
        row["stages"]["export"] = timed(["export", str(hf), "-o", str(exported)])
        row["float_weight_bytes"] = (exported / "model.onnx.data").stat().st_size
    for stage in [s for s in stages if s in STAGES]:
        name, options = STAGES[stage]
        out = work / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        if stage == "gptq":
            options = [*options, "--calib-samples", str(calib_samples)]
        row["stages"][name] = timed(["model", str(exported / "model.onnx"), *options, "--no-eval", "-o", str(out)])
        row["stages"][name]["artifact_bytes"] = artifact.model_bytes(out / "model.onnx")
        if stage == "rtn" and "run" in stages:  # the artifact decodes within the machine's memory
            row["stages"]["run 8 tokens"] = timed(["run", str(out), "-p", PROMPT, "-n", "8"])
        shutil.rmtree(out)
    if "gptq-blocks" in stages:
        row["stages"]["ort-int4 gptq, 2 blocks"] = gptq_blocks(exported / "model.onnx", work / "gptq-blocks", calib_samples)
    for stage in row["stages"].values():
        stage["rss_over_float_weights"] = round(stage["peak_rss_bytes"] / row["float_weight_bytes"], 3)
    print(json.dumps(row, indent=2))
    return row


def table(rows: list[dict], calib_samples: int) -> list[str]:
    gb = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
    lines = [f"# Streaming compiles of random Llama models (one process per stage, `/usr/bin/time -v`; GPTQ on "
             f"{calib_samples} calibration windows of 512 tokens)", "",
             "| size | params | float weights GB | stage | wall s | peak RSS GB | RSS / float weights | artifact GB |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: r["params"]):
        for stage, m in row["stages"].items():
            art = gb(m["artifact_bytes"]) if "artifact_bytes" in m else "–"
            wall = f"{m['seconds']:.0f}"
            if "projected_total_seconds" in m:
                wall = (f"{m['seconds_to_first_block']:.0f} to block 1, {m['seconds_per_block']:.0f}/block; "
                        f"projected {m['projected_total_seconds']:.0f}")
            lines.append(f"| {row['size']} | {row['params'] / 1e9:.2f} B | {gb(row['float_weight_bytes'])} | {stage} | "
                         f"{wall} | {gb(m['peak_rss_bytes'])} | {m['rss_over_float_weights']:.2f} | {art} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--stages", nargs="+", choices=["export", *STAGES, "run", "gptq-blocks"],
                        default=["export", "rtn", "run", "trt", "gptq"])
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--work", type=pathlib.Path, default=None,
                        help="Folder that keeps each size's model and export between runs [default: a temporary one]")
    args = parser.parse_args()
    previous = RESULTS / f"{NAME}.json"
    rows = {r["size"]: r for r in json.loads(previous.read_text())["rows"]} if previous.is_file() else {}
    for size in args.sizes:
        with contextlib.ExitStack() as stack:
            work = args.work or pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qcompile-big-")))
            rows[size] = run_size(size, work / size, args.stages, args.calib_samples, rows.get(size))
        save(NAME, {**meta(calib_samples=args.calib_samples), "rows": list(rows.values())},
             table(list(rows.values()), args.calib_samples))


if __name__ == "__main__":
    main()
