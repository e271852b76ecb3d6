"""Which architecture families compile, for which targets: qcompile beside onnxruntime-genai's builder.

    python benchmarks/bench_architectures.py [--families phi3,gpt2] [--targets ort-int4,trt-int4]

For every family of tests/families.py (tiny random models from transformers configs, saved as Hugging Face
folders with a byte-level tokenizer): `qcompile.compile` for each target (its default recipe, on 2 short
calibration windows, no evaluation) and for each recipe of RECIPES on ort-int4 (`--algo` rtn, gptq, awq,
awq+gptq; the W4A4/KV4 reference: rotations, int4 activations, a 4-bit KV cache), then a cached decode of the artifact (the edge package: onnxruntime-genai generates 4 tokens from it); and
onnxruntime-genai's model
builder (`-p int4 -e cpu`) on the same folder, whose model is then run by onnxruntime-genai for 4 tokens.
A cell is `ok`, or the first line of why not. Writes benchmarks/results/architectures.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import qcompile  # noqa: E402
from tests.families import FAMILIES, write_folder  # noqa: E402

from _results import meta, save  # noqa: E402

TARGETS = ["ort-int4", "trt-int4", "edge-int4", "ort-w8a8", "trt-int8", "trt-fp8", "ort-w4a8"]
# Recipes beside the targets' defaults, each on ort-int4: the weight algorithms and the W4A4/KV4 reference.
RECIPES = {
    "rtn": dict(algo="rtn"), "gptq": dict(algo="gptq"), "awq": dict(algo="awq"), "awq+gptq": dict(algo="awq+gptq"),
    "w4a4-kv4": dict(rotate=True, activations="int4-dynamic", kv_cache_bits=4),
}


def first_line(text: str, limit: int = 160) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "?")
    return line[:limit]


def qcompile_cell(folder: pathlib.Path, target: str, out: pathlib.Path) -> tuple[str, dict]:
    """`target`'s default recipe, or a name of RECIPES (on ort-int4)."""
    from qcompile.runtime import Decoder

    started = time.perf_counter()
    overrides = RECIPES.get(target, {})
    try:
        art = qcompile.compile(folder, "ort-int4" if overrides else target, out, eval_windows=None, calib_samples=2,
                               calib_seqlen=128, **overrides)
        decoder = Decoder(art.model_path)
        ids = np.arange(3, 15)[None]
        _, cache = decoder.forward(ids[:, :-1], decoder.empty_cache(), 0)
        logits, _ = decoder.forward(ids[:, -1:], cache, ids.shape[1] - 1)
        if not np.isfinite(logits).all():
            return "non-finite logits", {}
        if target.startswith("edge") and (fails := genai_fails(art.path)) is not None:
            return f"compiled; onnxruntime-genai fails: {fails}", {}
        skipped = [p["skipped"] for p in art.manifest["passes"] if "skipped" in p]
        unfused = [p["fused_attention"] for p in art.manifest["passes"] if p.get("fused_attention", "all blocks") != "all blocks"]
        return "ok", {"seconds": round(time.perf_counter() - started, 1), "skipped": skipped, "unfused": unfused}
    except qcompile.QcompileError as e:
        return str(e).splitlines()[0][:200], {}
    except Exception as e:  # noqa: BLE001 (a crash is a finding too)
        return f"crash: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", {}


def builder_cell(folder: pathlib.Path, out: pathlib.Path) -> str:
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                          "-p", "int4", "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")],
                         capture_output=True, text=True, timeout=900)
    if run.returncode:
        return first_line(run.stderr or run.stdout).replace(str(folder), "<folder>")
    fails = genai_fails(out)
    return "ok" if fails is None else "built; generation fails: " + fails


def genai_fails(folder: pathlib.Path) -> str | None:
    """None if onnxruntime-genai loads the model folder and generates 4 tokens, else the first line of why."""
    check = ("import onnxruntime_genai as og, sys\n"
             "m = og.Model(sys.argv[1]); p = og.GeneratorParams(m); p.set_search_options(max_length=12)\n"
             "g = og.Generator(m, p); g.append_tokens([[3, 4, 5, 6, 7, 8, 9, 10]])\n"
             "for _ in range(4): g.generate_next_token()\n")
    run = subprocess.run([sys.executable, "-c", check, str(folder)], capture_output=True, text=True, timeout=300)
    return None if run.returncode == 0 else first_line(run.stderr or run.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--targets", default=",".join(TARGETS + list(RECIPES)),
                        help="targets (their default recipes) and recipe names of RECIPES (on ort-int4)")
    parser.add_argument("--no-builder", action="store_true")
    parser.add_argument("--update", action="store_true",
                        help="rerun only --families and replace their rows in the saved results")
    args = parser.parse_args()
    families, targets = args.families.split(","), args.targets.split(",")

    work = pathlib.Path(tempfile.mkdtemp(prefix="qcompile-bench-arch-"))
    rows = []
    for family in families:
        folder = work / family / "hf"
        write_folder(family, folder)
        row = {"family": family, "qcompile": {}, "details": {}}
        for target in targets:
            row["qcompile"][target], row["details"][target] = qcompile_cell(folder, target, work / family / target)
            print(f"{family:14s} {target:10s} {row['qcompile'][target]}", flush=True)
        if not args.no_builder:
            row["builder"] = builder_cell(folder, work / family / "genai")
            print(f"{family:14s} builder    {row['builder']}", flush=True)
        rows.append(row)
    if args.update:
        import json

        from _results import RESULTS

        new = {r["family"]: r for r in rows}
        saved = json.loads((RESULTS / "architectures.json").read_text())["rows"]
        rows = [new.pop(r["family"], r) for r in saved] + list(new.values())
        targets = list(rows[0]["qcompile"])

    covered = {"qcompile": sum(all(v == "ok" for v in r["qcompile"].values()) for r in rows)}
    if not args.no_builder:
        covered["builder"] = sum(r["builder"] == "ok" for r in rows)
    lines = [f"# Architectures × targets (tiny random models, {len(rows)} families)", "",
             f"Families where every target compiles: qcompile {covered['qcompile']} of {len(rows)}"
             + (f"; onnxruntime-genai builder (int4 CPU, built and generating) {covered['builder']} of {len(rows)}"
                if "builder" in covered else "") + ".", "",
             "| family | " + " | ".join(targets) + (" | builder -p int4 -e cpu |" if not args.no_builder else ""),
             "|---|" + "---|" * (len(targets) + (0 if args.no_builder else 1))]
    for r in rows:
        cells = [r["qcompile"][t] for t in targets] + ([r["builder"]] if not args.no_builder else [])
        lines.append(f"| {r['family']} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    notes = sorted({f"{r['family']} {t}: {s}" for r in rows for t, d in r["details"].items() for s in d.get("skipped", [])})
    if notes:
        lines += ["", "Rotations skipped where the structure does not allow them (the manifest says so):", ""]
        lines += [f"- {n[:220]}" for n in notes]
    save("architectures", {"meta": meta(), "rows": rows, "covered": covered}, lines)


if __name__ == "__main__":
    main()
