"""Compile SmolLM2 for every target with its defaults and record what each artifact is: the model files'
hashes, the compile time (export cached, no evaluation) and, with --ppl, perplexity on 32 windows.

    PYTHONPATH=old-checkout python benchmarks/bench_refactor_parity.py --out before.json  # on the old code
    python benchmarks/bench_refactor_parity.py --out after.json --against before.json

`--against` prints, per target, whether the model files are byte-identical and the perplexity change, and
writes it to benchmarks/results/refactor_parity.{json,md}; `--compare-only` compares an existing --out
with --against, compiling nothing. Uses only the public API (qcompile.compile, qcompile.evaluate,
qcompile.artifact.file_hashes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import qcompile
from qcompile import artifact
from _results import meta, save

TARGETS = ["ort-int4", "trt-int4", "edge-int4", "ort-w8a8", "ort-w4a8", "trt-int8", "trt-fp8"]


def run(targets: list[str], windows: int | None, work: pathlib.Path) -> dict:
    qcompile.export("smollm2-135m")  # cached: the timings below exclude the export
    rows = {}
    for name in targets:
        out = work / name
        started = time.perf_counter()
        qcompile.compile("smollm2-135m", target=name, out_dir=out, eval_windows=None)
        seconds = time.perf_counter() - started
        files = {k: v["sha256"] for k, v in artifact.file_hashes(out).items() if k.startswith("model.onnx")}
        row = {"seconds": round(seconds, 1), "files": files}
        if windows:
            row["ppl"] = qcompile.evaluate(out, windows=windows, latency=False)["ppl"]
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    return rows


def compare(before: dict, after: dict) -> list[str]:
    lines = ["| target | model files | ppl before | ppl after | change | compile s before | after |", "|---|---|---|---|---|---|---|"]
    for name, a in after.items():
        b = before.get(name)
        if b is None:
            continue
        same = "identical" if a["files"] == b["files"] else "differ"
        pb, pa = b.get("ppl"), a.get("ppl")
        change = f"{100 * (pa / pb - 1):+.3f} %" if pb and pa else "-"
        lines.append(f"| {name} | {same} | {pb} | {pa} | {change} | {b['seconds']} | {a['seconds']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--against", type=pathlib.Path)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--ppl-windows", type=int, default=32, help="0 skips perplexity")
    parser.add_argument("--compare-only", action="store_true", help="compare --out with --against; compile nothing")
    args = parser.parse_args()
    if args.compare_only:
        rows = json.loads(args.out.read_text())
    else:
        with tempfile.TemporaryDirectory() as work:
            rows = run(args.targets.split(","), args.ppl_windows, pathlib.Path(work))
        args.out.write_text(json.dumps(rows, indent=2))
    if args.against:
        before = json.loads(args.against.read_text())
        save("refactor_parity", {"meta": meta(windows=args.ppl_windows), "before": before, "after": rows},
             compare(before, rows))


if __name__ == "__main__":
    main()
