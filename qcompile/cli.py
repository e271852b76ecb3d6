"""The `qcompile` command line (typer + rich). Errors become one line on stderr and an exit code:
2 for bad input, 1 for internal errors; `--debug` anywhere shows the traceback instead."""

from __future__ import annotations

import collections
import enum
import json
import pathlib
import shutil
import sys
from inspect import Parameter, Signature, signature
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from qcompile import errors, evaluation

app = typer.Typer(
    help="qcompile: compile Hugging Face / GGUF / ONNX causal LMs into quantized ONNX models for ONNX Runtime.\n\n"
    "`qcompile SOURCE --target T` is short for `qcompile model SOURCE --target T`. Add --debug for tracebacks.",
    no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False, rich_markup_mode=None,
)


def _console() -> Console:
    # tables stay readable when piped (rich would assume 80 columns); rich decides on colour when a Console
    # is made (only for a terminal, unless FORCE_COLOR), so main() makes a fresh one for the streams of each run
    return Console(width=shutil.get_terminal_size((160, 40)).columns)


console = _console()


class Width(str, enum.Enum):
    default = "default"
    float = "float"
    int8 = "int8"
    int4 = "int4"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _progress():
    from qcompile.progress import RichProgress

    return RichProgress(Console(stderr=True))


@app.command()
def model(
    source: str = typer.Argument("smollm2-135m", help="HF model folder, .gguf file, .onnx file/folder, or alias smollm2-135m."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target name (see `qcompile targets`), or several separated by commas: quantized once, lowered to each, verified across [default: the recipe's, else ort-int4]."),
    out: Optional[pathlib.Path] = typer.Option(None, "--out", "-o", help="Artifact folder; with several targets, the folder that holds one per target [default: qcompile-out/<model>-<target>]."),
    recipe: Optional[pathlib.Path] = typer.Option(None, "--recipe", help="A recipe file (TOML or JSON, see `qcompile recipe`) or an artifact's manifest.json, applied over the target's defaults; the options below override it."),
    algo: Optional[str] = typer.Option(None, "--algo", help="Weight algorithm: rtn, gptq, awq or awq+gptq [default: the target's: awq+gptq for ort-int4, trt-int4 and edge-int4]."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: visit input channels by decreasing activation energy [default: off]."),
    gptq_mode: Optional[str] = typer.Option(None, "--gptq-mode", help="GPTQ: parallel (all Hessians from the float model, one calibration run) or sequential (block by block on the partly quantized model; each block runs twice: measure, then propagate) [default: parallel]."),
    calib: Optional[pathlib.Path] = typer.Option(None, "--calib", help="Calibration text or JSONL ({\"text\": ...} lines) [default: packaged WikiText-2 valid.txt]."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration windows [default: the target's, 16 for ort-int4, trt-int4 and edge-int4; else 128, or 32 when only a 4-bit lm_head is calibrated]."),
    calib_seqlen: Optional[int] = typer.Option(None, "--calib-seqlen", help="Tokens per calibration window (at most the model's context) [default: 512]."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Weight bits for the block linears: 2 (ONNX Runtime targets), 4 or 8 [default: the target's, 4]."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Block size along K: 32, 64 or 128, or 0 for one scale per output channel [default: the target's]."),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="Symmetric (signed, no zero point) or asymmetric weights [default: the target's, symmetric]."),
    positive_scales: Optional[bool] = typer.Option(None, "--positive-scales/--signed-scales", help="Symmetric scales kept positive (TensorRT; use on ort-/edge- targets for the same integers as trt-) or ORT's signed full-range scales (more accurate) [default: the target's]."),
    lm_head: Width = typer.Option(Width.default, "--lm-head", help="lm_head precision; int4 is GPTQ (calibrated) in groups of --lm-head-group-size [default: the target's, int4 for ort-int4, trt-int4 and edge-int4, else int8]."),
    lm_head_group_size: Optional[int] = typer.Option(None, "--lm-head-group-size", help="A 4-bit lm_head's block size along K: 32, 64 or 128 (TensorRT: 64 or 128) [default: the target's, 64 for ort-int4, trt-int4 and edge-int4]."),
    embeddings: Width = typer.Option(Width.default, "--embeddings", help="Token-embedding table precision; a tied table of lm_head's width takes lm_head's integers (stored once on ONNX Runtime) [default: the target's, int4 for ort-int4, trt-int4 and edge-int4, else float]."),
    activations: Optional[str] = typer.Option(None, "--activations", help="Activation quantization: none, int8-static, int8-dynamic, int4-dynamic or fp8-static [default: the target's]."),
    activation_clip: Optional[float] = typer.Option(None, "--activation-clip", help="Dynamic per-token activations: scale = clip · max|x| / qmax, clip in 0.5..1 [default: 0.75 for int4-dynamic, else 1]."),
    kv_cache: Width = typer.Option(Width.default, "--kv-cache", help="KV-cache precision: symmetric, a calibrated scale per KV head and channel; ORT targets store it quantized in GroupQueryAttention [default: float]."),
    smoothquant: Optional[bool] = typer.Option(None, "--smoothquant/--no-smoothquant", help="Fold SmoothQuant scales into the norms before quantizing [default: on for W8A8 targets]."),
    alpha: Optional[str] = typer.Option(None, "--alpha", help="SmoothQuant migration strength 0..1, or auto (searched per layer) [default: the target's]."),
    smooth_up_down: Optional[bool] = typer.Option(None, "--smooth-up-down/--no-smooth-up-down", help="SmoothQuant also on down_proj's input (scales folded into up_proj) [default: the target's]."),
    accuracy_level: Optional[int] = typer.Option(None, "--accuracy-level", help="ORT MatMulNBits accuracy_level: 0 (fp32 compute) or 4 (int8 activations) [default: 4]."),
    eval_windows: int = typer.Option(32, "--eval-windows", help="WikiText-2 test windows of 512 tokens to evaluate."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip perplexity and latency measurement."),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", help="Accuracy gate: fail (exit 3, nothing written) when perplexity rises more than this percentage over the float model's."),
    engine: bool = typer.Option(False, "--engine", help="trt-* targets: also build a TensorRT engine (see `qcompile build`)."),
    bits_per_weight: Optional[float] = typer.Option(None, "--bits-per-weight", help="Mixed precision: choose each linear's format (and lm_head's) by measured sensitivity, for the least estimated loss within this many stored bits per weight (scales included), e.g. 3.5."),
    search: bool = typer.Option(False, "--search", help="With --max-ppl-increase alone: the smallest weight mix whose measured perplexity meets it (larger mixes are tried while it misses); on static-activation targets (trt-int8, trt-fp8), the fewest kinds of linears (blocks.*.down, ...) kept at float inputs that meet it, added to the recipe's activations.float_inputs."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Formats the search chooses among, comma-separated, e.g. int2g64,int4g128,int8g128,float [default: the target's; `qcompile targets`]."),
    rotate: Optional[bool] = typer.Option(None, "--rotate/--no-rotate", help="QuaRot: rotate the residual stream and value heads, online Hadamard before down_proj [default: on for ort-w4a8]."),
    rotation_seed: Optional[int] = typer.Option(None, "--rotation-seed", help="Seed of the rotations' random signs [default: 0]."),
    attention_hadamards: Optional[bool] = typer.Option(None, "--attention-hadamards/--no-attention-hadamards", help="QuaRot: online Hadamards also before o_proj and on post-RoPE queries/keys [default: on with --rotate when activations are int4 or the KV cache is quantized]."),
    rotation: Optional[str] = typer.Option(None, "--rotation", help="QuaRot: how block norm outputs are rotated: residual (the residual stream, offline) or smoothed (each norm output, and down_proj's input, scaled per channel before an online Hadamard; calibrated) [default: smoothed for int4 activations, else residual]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted --algo gptq compile of the same model and options from its last finished layer (state kept in .OUT.qcompile-state beside the output)."),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="ONNX Runtime targets: fuse attention (GroupQueryAttention) and norms (SkipSimplifiedLayerNormalization) [default: on]."),
):
    """Compile a model for a target: export, quantize, lower, evaluate, write the artifact."""
    from qcompile import fidelity, pipeline

    options = _recipe_options(locals())
    run = dict(eval_windows=None if no_eval else eval_windows, max_ppl_increase=max_ppl_increase, engine=engine)
    searched = dict(bits_per_weight=bits_per_weight, search=search, formats=formats.split(",") if formats else None)
    if target and "," in target:
        if resume:
            raise errors.InputError("--resume continues one target's GPTQ compile: name one --target")
        if search or bits_per_weight is not None:
            raise errors.InputError("a mixed-precision search compiles for one target: name one --target")
        with _progress() as progress:
            arts = pipeline.compile_many(source, [t.strip() for t in target.split(",")], out, recipe, progress=progress, **run, **options)
        for art in arts.values():
            _print_summary(art)
        return _print_verification(fidelity.verify_all([art.path for art in arts.values()]))
    with _progress() as progress:
        art = pipeline.compile(source, target, out, recipe, resume=resume, progress=progress, **run, **searched, **options)
    _print_summary(art)


_WIDTHS = {"float": None, "int8": 8, "int4": 4}
_WIDTH_OPTIONS = {"lm_head": "lm_head_bits", "embeddings": "embedding_bits", "kv_cache": "kv_cache_bits"}


def _recipe_options(given: dict) -> dict:
    """The recipe overrides among a command's parameters: those the user gave (`recipe.OPTIONS` names)."""
    from qcompile.recipe import OPTIONS

    options = {name: value for name, value in given.items() if name in OPTIONS and value is not None}
    for param, option in _WIDTH_OPTIONS.items():
        if given.get(param, Width.default) != Width.default:
            options[option] = _WIDTHS[given[param].value]
    if isinstance(options.get("alpha"), str):
        from qcompile.schemes import parse_alpha

        options["alpha"] = parse_alpha(options["alpha"])
    if "calib" in options:
        options["calib"] = str(options["calib"])
    return options


def recipe_(target: Optional[str] = None, recipe: Optional[pathlib.Path] = None, **options):
    """Print the resolved recipe as TOML: the target's defaults, a recipe file, then the options (those of
    `qcompile model`) over them."""
    from qcompile import recipe as recipe_mod

    sys.stdout.write(recipe_mod.to_toml(recipe_mod.resolve(target, recipe, _recipe_options(options))))


def _recipe_parameters() -> Signature:
    """`qcompile model`'s --target, --recipe and recipe options: the parameters of `qcompile recipe`."""
    from qcompile.recipe import OPTIONS

    keep = {"target", "recipe", *OPTIONS, *_WIDTH_OPTIONS}
    of_model = signature(model, eval_str=True)
    return of_model.replace(parameters=[p.replace(kind=Parameter.KEYWORD_ONLY)
                                        for p in of_model.parameters.values() if p.name in keep])


recipe_.__signature__ = _recipe_parameters()
app.command("recipe")(recipe_)


def _print_summary(art) -> None:
    m = art.metrics
    table = Table(title=f"qcompile {art.manifest['target']['name']}: {pathlib.Path(art.manifest['source']['path']).name}")
    table.add_column("metric")
    table.add_column("float", justify="right")
    table.add_column("quantized", justify="right")
    table.add_column("change", justify="right")
    if "float" in m:
        f, q = m["float"], m["quantized"]
        table.add_row(f"perplexity ({q['windows']}×512 tokens)", f"{f['ppl']:.3f}", f"{q['ppl']:.3f}", f"{m['ppl_increase_pct']:+.2f} %")
        table.add_row("argmax agreement", "", f"{100 * m['argmax_agreement']:.1f} %", "")
        table.add_row("size", _mb(f["size_bytes"]), _mb(q["size_bytes"]), f"{m['size_ratio']:.2f}×")
        table.add_row(f"prefill {q['prompt_len']} tokens", f"{f['prefill_ms']:.0f} ms", f"{q['prefill_ms']:.0f} ms",
                      f"{f['prefill_ms'] / q['prefill_ms']:.2f}× faster")
        table.add_row("decode per token", f"{f['decode_ms_per_token']:.1f} ms", f"{q['decode_ms_per_token']:.1f} ms",
                      f"{m['decode_speedup']:.2f}× faster")
    if m.get("bits_per_weight") is not None:
        search = art.manifest.get("search")
        note = f"estimated {search['estimated_ppl_increase_pct']:+.2f} % ppl" if search else ""
        table.add_row("bits per weight (stored)", "", f"{m['bits_per_weight']:.3f}", note)
    if "accuracy_gate" in m:
        table.add_row("accuracy gate", "", f"passed (≤ {m['accuracy_gate']['max_ppl_increase_pct']:g} %)", "")
    table.add_row("compile time", "", f"{m['compile_seconds']:.0f} s", "")
    console.print(table)
    console.print(f"Artifact written to [bold]{art.path}[/bold]")
    if "package" in art.manifest:
        console.print(f"Edge package: {art.path} and {art.path.with_name(art.manifest['package']['zip'])}")
    if "engine" in art.manifest:
        _print_engine(art.manifest["engine"])


def _print_engine(record: dict) -> None:
    console.print(f"TensorRT engine ({record['builder']} {record['version']}): {record['file']}, "
                  f"{_mb(record['bytes'])}, built in {record['build_seconds']:.0f} s; deserialized: {record['deserialized']}")


@app.command()
def export(
    source: str = typer.Argument("smollm2-135m", help="HF model folder, .gguf file, or alias smollm2-135m."),
    out: pathlib.Path = typer.Option(..., "--out", "-o", help="Folder to write model.onnx, its data and tokenizer files to."),
):
    """Export a model to an fp32 ONNX KV-cache decoder (onnxruntime-genai I/O names)."""
    from qcompile import pipeline

    with _progress() as progress:
        folder = pipeline.export(source, out, progress=progress)
    console.print(f"Exported to [bold]{folder}[/bold]")


@app.command("eval")
def eval_(
    path: str = typer.Argument(..., help="Artifact or export folder, .onnx file (tokenizer.json beside it), or a float source (HF folder, .gguf, smollm2-135m)."),
    windows: int = typer.Option(evaluation.DEFAULT_WINDOWS, "--windows", help="Number of 512-token WikiText-2 test windows."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Also measure prefill and decode latency."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Perplexity on the pinned WikiText-2 protocol (and latency, size)."""
    from qcompile import pipeline

    if windows < 1:
        raise errors.InputError(f"--windows {windows}: use a positive number of windows")
    with _progress() as progress:
        result = pipeline.evaluate(path, windows, latency, progress)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("perplexity", f"{result['ppl']:.3f}")
    table.add_row("tokens scored", f"{result['tokens']} ({result['windows']} windows × 511)")
    table.add_row("size", _mb(result["size_bytes"]))
    if latency:
        table.add_row(f"prefill {result['prompt_len']} tokens", f"{result['prefill_ms']:.0f} ms")
        table.add_row("decode per token", f"{result['decode_ms_per_token']:.1f} ms")
    console.print(table)
    console.print(f"protocol: {evaluation.PROTOCOL}")


@app.command()
def run(
    path: pathlib.Path = typer.Argument(..., help="Artifact or export folder."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 for greedy; otherwise sampling temperature."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
):
    """Generate text from a prompt with the KV cache, streaming tokens to the terminal."""
    from qcompile import generation, runtime

    decoder = runtime.Decoder(path)
    tokenizer = runtime.load_tokenizer(decoder.path.parent)
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise errors.InputError("--prompt is empty: give some text to continue")
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    tokens = generation.generate(decoder, ids, max_new_tokens, temperature, top_p, seed, runtime.eos_token_ids(decoder.path.parent))
    generation.stream_text(tokenizer, ids, tokens, write)
    sys.stdout.write("\n")


@app.command()
def inspect(path: pathlib.Path = typer.Argument(..., help="An .onnx file, or an export/artifact folder.")):
    """Print the structure qcompile finds: blocks, norms, linears with roles, shapes and formats."""
    from qcompile import analysis, artifact, runtime, targets

    model_path = runtime.model_file(path)
    graph_model = artifact.load_onnx(model_path)
    mm = analysis.analyze(graph_model, targets.reading(graph_model).forms)
    table = Table(title=f"{model_path}: {len(mm.blocks)} blocks, hidden {mm.hidden_size}")
    for col in ("linear", "role", "in", "out", "fed by", "weights"):
        table.add_column(col)
    for b in mm.blocks:
        for lin in b.linears.values():
            fed = f"{lin.norm.kind}norm" if lin.norm is not None else ("residual stream" if lin.role not in (
                analysis.Role.O, analysis.Role.DOWN) else "")
            parts = f" ({', '.join(f'{r.value} {a}:{z}' for r, (a, z) in lin.parts.items())})" if lin.parts else ""
            table.add_row(lin.name, lin.role.value + parts, str(lin.in_features), str(lin.out_features), fed, lin.format())
        for t in b.experts.tables if b.experts else ():
            dq = t.table.producer()
            if t.matmul is None:  # a block its target lowered into one node: codes packed into bytes
                stored = f"{t.reader.op_type} {8 // t.packed}-bit"
            elif dq is not None:
                stored = f"{dq.inputs[0].dtype.name} block {dq.attributes.get_int('block_size', 0)} (DequantizeLinear)"
            else:
                stored = t.table.dtype.name
            k, n = t.shape[t.in_axis], t.shape[3 - t.in_axis]
            table.add_row(t.name, f"{t.shape[0]} experts", str(k), str(n), "router's choice", stored)
    head = mm.lm_head
    table.add_row(head.name, head.role.value, str(head.in_features), str(head.out_features),
                  f"{mm.final_norm.kind}norm (final)", head.format() + (" (tied to embedding)" if mm.tied_lm_head else ""))
    console.print(table)
    emb = mm.embedding.inputs[0]
    shared = emb.producer() is not None and emb.producer().op_type == "Reshape"
    emb = emb.producer().inputs[0] if shared else emb  # lm_head's MatMulNBits weight, read as the table
    console.print(f"embedding: {mm.embedding.op_type} of {emb.name} {list(emb.shape)} {emb.dtype.name}"
                  + (" (lm_head's weight, shared)" if shared else ""))
    b = mm.blocks[0]
    mlp = "mixture-of-experts MLP (router kept float)" if b.experts else f"{'gated' if b.gated else 'plain'} MLP"
    console.print(f"blocks: {'parallel' if b.parallel else 'sequential'} attention and {mlp}; "
                  f"pre-norms per block: {len(b.norms())}, post-norms: {len(b.branch_norms)}; final norm: "
                  f"{mm.final_norm.kind}" + (f"; logit softcap {mm.logit_softcap:g}" if mm.logit_softcap else "")
                  + (f"; embeddings × {mm.embedding_scale:g}" if mm.embedding_scale else ""))
    if (a := b.attention) is not None:  # decomposed (a fused attention op holds these itself)
        heads = f"{a.heads[0]} query / {a.heads[1]} key-value heads" if a.heads else "heads not static"
        rope = ("no RoPE" if a.rotary is None else "RoPE" if a.rotary.dims is None else f"RoPE on {a.rotary.dims} channels")
        size = a.head_size(a.key_cache)
        console.print(f"attention: {heads}{f' of {size}' if size else ''}; {rope}"
                      + ("; q/k norms" if a.query_norm else "") + (f"; softcap {a.softcap:g}" if a.softcap else ""))
    ops = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in graph_model.graph)
    quant = {k: v for k, v in ops.items() if any(s in k.lower() for s in ("quantize", "nbits", "integer", "qcompile"))}
    console.print(f"nodes: {sum(ops.values())}; quantized ops: {quant or 'none'}")


@app.command()
def check(
    path: pathlib.Path = typer.Argument(..., help="A trt-* artifact folder or .onnx file."),
    target: str = typer.Option("trt-int4", "--target", "-t", help="The TensorRT target whose rules to check."),
):
    """Check an ONNX model against TensorRT's explicit-quantization rules (exit 1 on any violation); in an
    artifact, also that every weight its compile quantized is still quantized (not folded to float)."""
    from qcompile import artifact, fidelity, runtime, targets as registry

    tgt = registry.get(target)
    if tgt.rules is None:
        raise errors.InputError(f"`qcompile check` checks a runtime's rules on a model; {target} is not a trt-* target")
    model_path = runtime.model_file(path)
    model = artifact.load_onnx(model_path)
    manifest_path = model_path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    expected = manifest.get("fidelity", {}).get("weights", {})
    by_rule = collections.defaultdict(list)
    for v in tgt.check(model):
        by_rule[v.rule].append(v.node)
    if expected:  # read back by the target that wrote them
        for problem in fidelity.compare_digests(expected, model, registry.of(manifest)):
            layer, rule = problem.split(": ", 1)
            by_rule[rule].append(layer)
    violations = sum(len(where) for where in by_rule.values())
    for rule, where in by_rule.items():
        more = f", … ({len(where)} in all)" if len(where) > 3 else ""
        console.print(f"[red]✗[/red] {rule}: {', '.join(where[:3])}{more}")
    if violations:
        raise errors.QcompileError(f"{violations} violation(s) of {tgt.rules} in {model_path}")
    console.print(f"[green]✓[/green] {model_path} conforms to {target}'s {tgt.rules}")


@app.command()
def build(
    path: pathlib.Path = typer.Argument(..., help="A trt-* artifact folder."),
    max_prompt: int = typer.Option(512, "--max-prompt", help="Most tokens in one prompt (profile 0)."),
    max_length: int = typer.Option(2048, "--max-length", help="Most tokens in the KV cache (profile 1)."),
):
    """Build a TensorRT engine (model.engine) inside a trt-* artifact: tensorrt, or TensorRT-RTX without a GPU."""
    from qcompile import engine as engine_mod

    if not 1 <= max_prompt <= max_length:
        raise errors.InputError(f"--max-prompt {max_prompt} must be between 1 and --max-length {max_length}")
    with _progress() as progress:
        record = engine_mod.build(path, engine_mod.Profiles(max_prompt, max_length, min(128, max_prompt), min(512, max_length)),
                                  progress)
    _print_engine(record)


@app.command()
def package(
    path: pathlib.Path = typer.Argument(..., help="An ONNX Runtime artifact folder (ort-int4, edge-int4)."),
    out: Optional[pathlib.Path] = typer.Option(None, "--out", "-o", help="Package folder [default: <artifact>-edge]; a zip is written beside it."),
    edge: bool = typer.Option(True, "--edge", help="Package for devices with onnxruntime-genai (the only kind today)."),
):
    """Write an edge package: model, tokenizer, genai_config.json, golden vectors, manifest; plus a zip."""
    from qcompile import artifact, package as package_mod, targets

    tgt = targets.of(artifact.Artifact.load(path).manifest)
    if not tgt.packages_edge:
        raise errors.InputError(f"'{path}' targets {tgt.runtime}, not ONNX Runtime: compile with --target edge-int4 (or ort-int4) to package it")
    folder = package_mod.package(path, out)
    console.print(f"Edge package written to [bold]{folder}[/bold] and {folder.with_name(folder.name + '.zip')}")


@app.command()
def verify(
    path: pathlib.Path = typer.Argument(..., help="An artifact folder."),
    against: Optional[pathlib.Path] = typer.Option(None, "--against", help="Another artifact of the same recipe (any target)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Prove an artifact holds the integers and scales its compile recorded (and those of --against)."""
    from qcompile import fidelity

    report = fidelity.verify(path, against)
    if as_json:
        print(json.dumps(report, indent=2))
    _print_verification({"pairs": [report], "passed": report["passed"]}, quiet=as_json)


def _print_verification(report: dict, quiet: bool = False) -> None:
    """Print each pair of a verify report; raise VerificationError when one failed."""
    for pair in report["pairs"] if not quiet else []:
        console.print(f"{pair['layers']} quantized linears decoded from {pair['artifact']}")
        if "logits" in pair:
            lg = pair["logits"]
            console.print(f"against {pair['against']}: max |Δlogits| {lg['max_abs_logit_diff']:.2e}, "
                          f"argmax agreement {100 * lg['argmax_agreement']:.1f} % over {lg['tokens']} tokens")
        for problem in pair["problems"]:
            console.print(f"[red]✗[/red] {problem}")
    if not report["passed"]:
        problem = next(p for pair in report["pairs"] for p in pair["problems"])
        raise errors.VerificationError(f"verification failed: {problem}")
    if not quiet:
        console.print("[green]✓[/green] integers and scales are bit-identical")


@app.command("targets")
def list_targets():
    """List the available targets."""
    from qcompile import targets as registry
    from qcompile.recipe import resolve

    table = Table(title="qcompile targets")
    for col in ("target", "runtime", "weights", "search formats", "description"):
        table.add_column(col)
    for name in registry.names():
        t = registry.get(name)
        plan = resolve(name)
        s, act = plan.weights, plan.activations
        layout = f"g{s.group_size}" if s.group_size else "per-channel"
        width = "fp8" if s.fp8 else f"{s.bits}-bit"
        weights = f"{s.algorithm.value} {width} {layout} {('sym' + (' (scales > 0)' if s.positive_scales else '')) if s.symmetric else 'asym'}"
        if act.kind.value != "none":
            weights += f"; activations {act.kind.value}{' + SmoothQuant' if act.smoothquant else ''}"
        if plan.rotation.enabled:
            weights = f"QuaRot rotations; {weights}"
        table.add_row(name, t.runtime, weights, ", ".join(t.mixed_formats) or "-", t.description)
    console.print(table)


# typer may vendor click: take its usage-error base class from typer's own BadParameter
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_COMMANDS = {"model", "recipe", "export", "eval", "run", "inspect", "targets", "check", "build", "package", "verify"}
_TOP_LEVEL = {"--help", "-h", "--install-completion", "--show-completion"}


_INTERRUPTED = 130  # 128 + SIGINT
_WRITES = {"model": "no artifact", "export": "no export", "build": "no engine", "package": "no package"}


def _interrupted(args: list[str]) -> int:
    """Ctrl-C: one line naming the stage it stopped and what that leaves behind."""
    from qcompile.passes.quantize_weights_gptq import GPTQ_WALK
    from qcompile.progress import RichProgress

    stage = RichProgress.stage
    line = "interrupted" + (f" {'after' if RichProgress.stage_done else 'during'} {stage}" if stage else "")
    command = args[0] if args else ""
    if command in _WRITES:
        line += f": {_WRITES[command]} was written"
    if command == "model" and stage and stage.startswith(GPTQ_WALK):  # the only stage that saves its work
        line += "; rerun with --resume to continue from the last finished layer"
    print(line, file=sys.stderr)
    return _INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    from qcompile.progress import RichProgress

    global console
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if args and args[0] not in _COMMANDS and args[0] not in _TOP_LEVEL:
        args.insert(0, "model")  # `qcompile SOURCE --target T` == `qcompile model SOURCE --target T`
    console = _console()  # colour only if this run's stdout is a terminal
    RichProgress.stage, RichProgress.stage_done = None, False
    try:
        result = app(args=args, prog_name="qcompile", standalone_mode=False)
        if result == _INTERRUPTED:  # typer turns Ctrl-C in a command into Exit(130) and returns its code here
            return _interrupted(args)
        return result if isinstance(result, int) else 0
    except errors.QcompileError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except _ClickException as e:
        e.show()
        return 2
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command's body (or typer raising Abort for it)
        return _interrupted(args)
    except Exception as e:  # an internal error: one line unless --debug
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())
