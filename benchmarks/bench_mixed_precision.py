"""Mixed precision on SmolLM2-135M: perplexity against stored bits per weight, uniform recipes and searched mixes, in one run.

    python benchmarks/bench_mixed_precision.py [--windows 128] [--budgets 3,3.5,u4,5,8]

Each measured row is kept in results/mixed_precision.partial.json as it completes; a rerun with the same
--windows takes those rows from it (delete the file to measure everything again).

Every model is an ort-int4 artifact with a float embedding table, calibrated on the same 32 packaged windows of 512
tokens, evaluated on --windows WikiText-2 test windows. Bits per weight are counted from each artifact's files, the
same way for the peer: MatMulNBits B + scales + zero points, 32 bits per float MatMul weight, over every linear
(lm_head included; the embedding table, a lookup, left out).
- uniform: every linear (lm_head too) in one format, by RTN, GPTQ, AWQ+GPTQ and QuaRot+GPTQ;
- searched: `qcompile model --bits-per-weight B` (QuaRot+GPTQ, the ORT formats int2g128, int2g64, int4g128, int4g64,
  int8g128, float) at each budget (u4: the bits of uniform int4 g128), with the search's estimate beside the
  measurement. Below 2.87 bits nothing fits: lm_head (a fifth of the weights) is 4-bit at least;
- peer: onnxruntime-genai's builder, int4 with `int4_algo_config=k_quant_mixed` (llama.cpp's rule: some layers
  int8 and lm_head int8), on an HF folder saved from the same GGUF (--skip-peer leaves it out);
- gate: `--search --max-ppl-increase 5` (evaluated on 32 windows, as the gate is), and its replay from the manifest,
  compared file by file;
- activations: trt-int8 (static per-tensor W8A8) with every input quantized, as it defaults (the down projections'
  inputs float), and `--search --max-ppl-increase 0.5` from every input quantized, which keeps the fewest kinds of
  inputs float (evaluated on --windows, so the bound is checked on them), with how many linears that is.
Writes benchmarks/results/mixed_precision.{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import tempfile
import time

import onnx_ir as ir

import qcompile
from qcompile import analysis, artifact, evaluation, runtime, schemes, sources, targets
from _results import RESULTS, meta, save

BASE = dict(target="ort-int4", embedding_bits=None, calib_samples=32, act_order=True, positive_scales=False)
ROTATED = dict(algo="gptq", rotate=True)
UNIFORM = {  # name → (options, format for the table)
    "RTN int4 g128": dict(algo="rtn", bits=4, group_size=128, lm_head_bits=4, lm_head_group_size=128),
    "GPTQ int4 g128": dict(algo="gptq", bits=4, group_size=128, lm_head_bits=4, lm_head_group_size=128),
    "AWQ+GPTQ int4 g128": dict(algo="awq+gptq", bits=4, group_size=128, lm_head_bits=4, lm_head_group_size=128),
    "QuaRot+GPTQ int4 g128": dict(**ROTATED, bits=4, group_size=128, lm_head_bits=4, lm_head_group_size=128),
    "QuaRot+GPTQ int2 g64, lm_head int4 g64": dict(**ROTATED, bits=2, group_size=64, lm_head_bits=4, lm_head_group_size=64),
}
PEER = "onnxruntime-genai builder int4 k_quant_mixed"
GATE = 5.0
ACTIVATION_BOUND = 0.5  # trt-int8's searched activation precision, percent


def linear_bits_per_weight(model_path: pathlib.Path) -> float:
    """Stored bits per weight of every linear in a model file: MatMulNBits B, scales and zero points, and 32 bits
    per weight of a MatMul with a float weight (a tied lm_head reads the table through a Transpose)."""
    model = ir.load(model_path)
    bits = weights = 0
    for node in model.graph.all_nodes():
        if node.op_type == "MatMulNBits":
            k, n = node.attributes["K"].as_int(), node.attributes["N"].as_int()
            bits += 8 * sum(v.const_value.nbytes for v in node.inputs[1:4] if v is not None and v.const_value is not None)
            weights += k * n
        elif node.op_type == "MatMul":
            w = node.inputs[1]
            if w.producer() is not None and w.producer().op_type == "Transpose":
                w = w.producer().inputs[0]
            if w.const_value is not None and len(w.shape) == 2:
                bits += 32 * w.const_value.size
                weights += w.const_value.size
    return bits / weights


def build_peer(work: pathlib.Path) -> pathlib.Path | None:
    """The builder's int4 k_quant_mixed model, or None (with the reason printed) when it does not build."""
    from bench_decode_peers import build_genai

    try:
        return build_genai(work, "int4_algo_config=k_quant_mixed", "genai-k-quant-mixed")
    except RuntimeError as e:
        print(e, flush=True)
        return None


def digest(folder: pathlib.Path) -> str:
    h = hashlib.sha256()
    for name in ("model.onnx", "model.onnx.data"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--budgets", default="3,3.5,u4,5,8")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--report", action="store_true", help="Only write the table, JSON and plot from the rows kept so far.")
    args = parser.parse_args()
    if args.report:
        kept = json.loads((RESULTS / "mixed_precision.partial.json").read_text())
        return report(kept["rows"], kept.get("gate"), kept["windows"], kept.get("activations"))

    with tempfile.TemporaryDirectory(prefix="qcompile-bench-mixed-") as tmp:
        work = pathlib.Path(tmp)
        os.environ.setdefault("QCOMPILE_CACHE_DIR", str(work / "cache"))
        float_dir = qcompile.export("smollm2-135m")
        tokenizer = runtime.load_tokenizer(float_dir)
        rows: dict[str, dict] = {}

        partial = RESULTS / "mixed_precision.partial.json"
        state = json.loads(partial.read_text()) if partial.is_file() else {}  # what a run on the same windows kept
        state = state if state.get("windows") == args.windows else {"windows": args.windows}
        kept = state.get("rows", {})

        def keep(key: str, value) -> None:
            state[key] = value
            partial.write_text(json.dumps(state, indent=2))

        def measure(name: str, folder: pathlib.Path, kind: str, **extra) -> None:
            ppl = evaluation.perplexity(runtime.Decoder(folder), tokenizer, args.windows).ppl
            rows[name] = {"kind": kind, "perplexity": round(ppl, 3), "bits_per_weight": round(linear_bits_per_weight(folder / "model.onnx"), 3),
                          "size_mb": round(artifact.model_bytes(folder / "model.onnx") / 1e6, 1), **extra}
            keep("rows", {**kept, **rows})
            print(name, rows[name], flush=True)

        def done(name: str) -> bool:
            if name in kept:
                rows[name] = kept[name]
                print(name, "(kept)", rows[name], flush=True)
            return name in kept

        if not done("float"):
            measure("float", float_dir, "float")
        for name, options in UNIFORM.items():
            if done(name):
                continue
            started = time.perf_counter()
            art = qcompile.compile("smollm2-135m", out_dir=work / name.replace(" ", "_"), eval_windows=None, **{**BASE, **options})
            measure(name, art.path, "uniform", compile_seconds=round(time.perf_counter() - started, 1),
                    manifest_bits_per_weight=art.metrics["bits_per_weight"])
        u4 = min(rows[name]["manifest_bits_per_weight"] for name in UNIFORM if name.endswith("int4 g128"))
        for budget in [u4 if b == "u4" else float(b) for b in args.budgets.split(",")]:
            if done(f"searched ≤ {budget:g} bits"):
                continue
            started = time.perf_counter()
            art = qcompile.compile("smollm2-135m", out_dir=work / f"mix-{budget}", eval_windows=None, bits_per_weight=budget,
                                   **{**BASE, **ROTATED})
            formats = [entry.split("=")[1] for entry in art.manifest["recipe"]["weights"]["layers"]]
            counts = {f: formats.count(f) for f in sorted(set(formats))}
            measure(f"searched ≤ {budget:g} bits", art.path, "searched", budget=budget, compile_seconds=round(time.perf_counter() - started, 1),
                    manifest_bits_per_weight=art.metrics["bits_per_weight"], formats=counts,
                    lm_head=art.manifest["recipe"]["lm_head"], estimated_ppl_increase_pct=art.manifest["search"]["estimated_ppl_increase_pct"])
        if "gate" not in state:
            keep("gate", measure_gate(work))
        measure_activations(work, args.windows, state.get("activations", {}), lambda rows: keep("activations", rows))
        gate, activations = state["gate"], state["activations"]

        if not args.skip_peer:
            peer = None if done(PEER) else build_peer(work)
            if peer is not None:
                measure(PEER, peer, "peer")

    report(rows, gate, args.windows, activations)


def report(rows: dict, gate: dict | None, windows: int, activations: dict | None = None) -> None:
    float_ppl = rows["float"]["perplexity"]
    for r in rows.values():
        r["ppl_increase_pct"] = round(100 * (r["perplexity"] / float_ppl - 1), 2)
    lines = table(rows, windows, gate) + acceptance(rows) + activation_table(activations)
    save("mixed_precision", {**meta(windows=windows, source=sources.resolve("smollm2-135m").describe()), "rows": rows, "gate": gate,
                             "activations": activations}, lines)
    plot(rows, windows)


ACTIVATION_ROWS = {  # trt-int8 rows: compile() options
    "every input quantized": dict(float_inputs=[]),
    "default (blocks.*.down float)": {},
    f"searched from every input quantized, --max-ppl-increase {ACTIVATION_BOUND:g}":
        dict(search=True, max_ppl_increase=ACTIVATION_BOUND, float_inputs=[]),
}


def measure_activations(work: pathlib.Path, windows: int, kept: dict, keep) -> dict:
    """trt-int8 with every input quantized, as it defaults, and searched from every input quantized under
    `--max-ppl-increase ACTIVATION_BOUND` (on `windows` windows): perplexity, the linears whose inputs stay
    float, size and compile time. Rows in `kept` are not measured again; `keep(rows)` after each one."""
    out = dict(kept)
    for name, options in ACTIVATION_ROWS.items():
        if name in out:
            continue
        started = time.perf_counter()
        try:
            art = qcompile.compile("smollm2-135m", "trt-int8", out_dir=work / f"trt-int8-{name}", eval_windows=windows, **options)
        except qcompile.AccuracyGateError as e:  # every try missed the bound: the message lists them
            out[name] = {"missed": str(e), "ppl_increase_pct": e.metrics["ppl_increase_pct"],
                         "seconds": round(time.perf_counter() - started, 1)}
            print("trt-int8", name, out[name], flush=True)
            keep(out)
            continue
        kept = art.manifest["recipe"]["activations"]["float_inputs"]  # names or patterns
        linears = [lin.name for lin in analysis.analyze(ir.load(art.path / "model.onnx"), targets.get("trt-int8").forms).linears()]
        out[name] = {"float_ppl": art.metrics["float"]["ppl"], "perplexity": art.metrics["quantized"]["ppl"],
                     "ppl_increase_pct": art.metrics["ppl_increase_pct"], "float_inputs": kept,
                     "float_input_linears": sum(schemes.matches(linear, tuple(kept)) for linear in linears),
                     "size_mb": round(art.metrics["quantized"]["size_bytes"] / 1e6, 1), "search": art.manifest.get("search"),
                     "seconds": round(time.perf_counter() - started, 1)}
        print("trt-int8", name, out[name], flush=True)
        keep(out)
    return out


def activation_table(activations: dict | None) -> list[str]:
    if activations is None:
        return ["", "trt-int8's activation precision was not measured in this run."]
    lines = ["", f"trt-int8 (static per-tensor int8 activations), perplexity on the same windows; searched: `--search "
             f"--max-ppl-increase {ACTIVATION_BOUND:g}` from every input quantized: the fewest kinds of linears (the same "
             "ones in every block) whose inputs stay float.", "",
             "| trt-int8 | perplexity | Δ vs float | linears with float inputs | size MB | compiles | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    missed = []
    for name, r in activations.items():
        if "missed" in r:
            lines.append(f"| {name} | | {r['ppl_increase_pct']:+.2f} % (last try) | | | | {r['seconds']:.0f} |")
            missed.append(f"{name}: {r['missed']}")
            continue
        compiles = len(r["search"]["tries"]) + 1 if r.get("search") else 1
        lines.append(f"| {name} | {r['perplexity']:.2f} | {r['ppl_increase_pct']:+.2f} % | {r['float_input_linears']} | "
                     f"{r['size_mb']:.0f} | {compiles} | {r['seconds']:.0f} |")
    return lines + [line for m in missed for line in ("", m)]


def measure_gate(work: pathlib.Path) -> dict:
    """`--search --max-ppl-increase GATE` (measured on 32 windows, as the gate is), and its replay from the manifest."""
    started = time.perf_counter()
    gated = qcompile.compile("smollm2-135m", out_dir=work / "gate", search=True, max_ppl_increase=GATE, **{**BASE, **ROTATED})
    gate = {"bound_pct": GATE, "ppl_increase_pct_32_windows": gated.metrics["ppl_increase_pct"],
            "size_mb": round(gated.metrics["quantized"]["size_bytes"] / 1e6, 1), "bits_per_weight": gated.metrics["bits_per_weight"],
            "search": gated.manifest["search"], "seconds": round(time.perf_counter() - started, 1)}
    replay = qcompile.compile("smollm2-135m", out_dir=work / "replay", recipe=gated.path / "manifest.json", eval_windows=None)
    gate["replay_identical"] = digest(replay.path) == digest(gated.path)
    print("gate", gate, flush=True)
    return gate


def table(rows: dict, windows: int, gate: dict | None) -> list[str]:
    lines = [f"SmolLM2-135M, ort-int4 artifacts, perplexity on {windows} windows; bits per weight stored, over every linear.", "",
             "| model | kind | bits/weight | perplexity | Δ vs float | estimated Δ | size MB | formats (block linears) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, r in sorted(rows.items(), key=lambda kv: (kv[1]["kind"] != "float", kv[1]["bits_per_weight"])):
        est = f"{r['estimated_ppl_increase_pct']:+.2f} %" if "estimated_ppl_increase_pct" in r else ""
        formats = ", ".join(f"{k} ×{v}" for k, v in r.get("formats", {}).items())
        if "lm_head" in r:
            head = r["lm_head"]
            formats += f"; lm_head {'float' if head['bits'] == 'float' else 'int%s' % head['bits']}"
        lines.append(f"| {name} | {r['kind']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} | {r['ppl_increase_pct']:+.2f} % | {est} | "
                     f"{r['size_mb']:.0f} | {formats} |")
    if gate is None:
        return lines + ["", "The `--search --max-ppl-increase` gate was not measured in this run."]
    lines += ["", f"`--search --max-ppl-increase {gate['bound_pct']:g}`: measured {gate['ppl_increase_pct_32_windows']:+.2f} % on 32 windows, "
              f"{gate['size_mb']:.0f} MB, {gate['bits_per_weight']:.3f} bits per weight, {len(gate['search']['tries']) + 1} compile(s), "
              f"{gate['seconds']:.0f} s; its replay from the manifest: {'the same files' if gate['replay_identical'] else 'DIFFERENT files'}."]
    return lines


def acceptance(rows: dict) -> list[str]:
    """The issue's two comparisons: at uniform int4 g128's bits, the searched mix against the best uniform int4 g128
    recipe; at 3.5 bits, the searched mix against uniform RTN int4 g128 (the better of its two lm_heads)."""
    searched = {r["budget"]: (name, r) for name, r in rows.items() if r["kind"] == "searched"}
    lines = [""]
    int4 = {name: r for name, r in rows.items() if r["kind"] == "uniform" and "int4 g128" in name}
    best_name, best = min(int4.items(), key=lambda kv: kv[1]["ppl_increase_pct"])
    at = [v for b, v in searched.items() if abs(b - best["manifest_bits_per_weight"]) < 1e-6]
    if at:
        name, r = at[0]
        lines.append(f"At uniform int4 g128's {best['manifest_bits_per_weight']:.3f} bits per weight: the searched mix {r['ppl_increase_pct']:+.2f} % "
                     f"against the best uniform int4 g128 recipe ({best_name}) {best['ppl_increase_pct']:+.2f} %: "
                     f"{r['ppl_increase_pct'] / best['ppl_increase_pct']:.2f}× its increase.")
    if 3.5 in searched:
        name, r = searched[3.5]
        rtn_name, rtn = min(((n, v) for n, v in rows.items() if n.startswith("RTN int4 g128")), key=lambda kv: kv[1]["ppl_increase_pct"])
        lines.append(f"At 3.5 bits per weight: the searched mix ({r['bits_per_weight']:.3f} bits in the files) {r['ppl_increase_pct']:+.2f} % "
                     f"against {rtn_name} ({rtn['bits_per_weight']:.3f} bits) {rtn['ppl_increase_pct']:+.2f} %.")
    return lines


def plot(rows: dict, windows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"uniform": ("o", "tab:blue"), "searched": ("s", "tab:red"), "peer": ("^", "tab:green")}
    for kind, (marker, color) in styles.items():
        points = sorted((r["bits_per_weight"], r["perplexity"], name) for name, r in rows.items() if r["kind"] == kind)
        if not points:
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=kind, zorder=3)
        if kind == "searched":
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, zorder=2)
        for x, y, name in points:
            if kind != "searched":
                ax.annotate(name, (x, y), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.axhline(rows["float"]["perplexity"], color="gray", linestyle="--", label="float")
    ax.set_xlabel("stored bits per weight (linears, scales included)")
    ax.set_ylabel(f"WikiText-2 perplexity ({windows} windows)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: searched mixes against uniform recipes (ort-int4)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "mixed_precision.png", dpi=120)


if __name__ == "__main__":
    main()
