"""Export a Hugging Face causal LM to an ONNX KV-cache decoder with `torch.onnx.export(dynamo=True)`.

The graph follows the I/O names onnxruntime-genai expects:

    input_ids [b, s], attention_mask [b, past + s], position_ids [b, s],
    past_key_values.N.key/.value [b, kv_heads, past, head_dim]
      -> logits [b, s, vocab], present.N.key/.value [b, kv_heads, past + s, head_dim]

Weights are fp32 initializers saved as external data (`model.onnx.data`), so models past 2 GB work. The export
streams: the model is built from its config without initialising its parameters (never resident), traced, and
each initializer is then read from the checkpoint (`qcompile.weights`) as it is written, so memory holds the
graph and one tensor whatever the model's size. torch and transformers are imported only here (the `export` extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import pathlib
import warnings
from unittest import mock

from qcompile import errors, repeat
from qcompile.analysis import SLIDING_WINDOWS_KEY
from qcompile.sources import Source, SourceKind

log = logging.getLogger(__name__)

EXPORT_FORMAT = 2  # bumped when the exported graph or its files change: cached exports of older formats are redone
OPSET = 21  # blocked DequantizeLinear (the canonical int4 form) needs opset 21
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_INLINE_BYTES = 256  # smaller initializers stay in model.onnx (onnx_ir's default)
DEDUP_LIMIT = 1 << 16  # initializers of at most this many values are compared for equal twins (norm gains, biases)
EXPORT_PIP = "pip install torch==2.13.0 && pip install 'qcompile[export]'"


def _require_export_deps():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise errors.MissingDependencyError(
            f"exporting a Hugging Face or GGUF model needs torch and transformers ({e.name} is missing): "
            f"run `{EXPORT_PIP}`"
        ) from None


def load_hf(source: Source):
    """Load (model, tokenizer) from a HF folder or GGUF file, in fp32 and eval mode: the whole model in memory
    (the streaming export reads the checkpoint itself; this serves checkpoints it cannot read and comparisons)."""
    _require_export_deps()
    with _gguf_parsed_once():
        return _load_hf(source)


def _hf_args(source: Source) -> tuple[pathlib.Path, dict]:
    """The folder and keyword arguments transformers' `from_pretrained` reads `source` with."""
    if source.kind != SourceKind.GGUF:
        return source.path, {}
    try:
        import gguf
    except ImportError:
        raise errors.MissingDependencyError(f"reading GGUF needs the gguf package: run `{EXPORT_PIP}`") from None
    try:
        gguf.GGUFReader(source.path)  # memory-mapped: a cheap check before transformers reads it
    except Exception as e:
        raise errors.CorruptModelError(
            f"'{source.path}' is not a readable GGUF file ({type(e).__name__}: {str(e)[:160]}): "
            "re-download or re-convert it"
        ) from None
    return source.path.parent, {"gguf_file": source.path.name}


def _unreadable(source: Source, e: Exception) -> errors.CorruptModelError:
    # a user's file: whatever transformers raises, the fix is in the input
    return errors.CorruptModelError(
        f"cannot load '{source.path}' as a causal LM ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
        "check that the file is complete and is a supported text model"
    )


def _load_tokenizer(source: Source):
    """The source's tokenizer, or None for a weights-only folder (evaluation then asks for tokenizer.json).
    Without tokenizer files transformers may build an empty tokenizer instead of failing: look for the files first."""
    import transformers

    folder, kwargs = _hf_args(source)
    if source.kind != SourceKind.GGUF and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        with _quiet():
            return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception:
        return None


def _load_hf(source: Source):
    import torch
    import transformers

    folder, kwargs = _hf_args(source)
    try:
        with _quiet():
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except Exception as e:
        raise _unreadable(source, e) from None
    return model.eval(), _load_tokenizer(source)


def _gguf_parsed_once():
    """One `GGUFReader` per file and one tensor-name map per (architecture, layers) while loading.

    transformers parses a GGUF file's metadata once for the config, once for the tokenizer and once for
    the weights, and rebuilds gguf's tensor-name map for every module: 32 of the 44 s it took to load
    SmolLM2-135M under cProfile. Both are read-only, so one of each serves every caller.
    """
    try:
        import gguf
    except ImportError:
        return contextlib.nullcontext()
    read, names = functools.lru_cache(maxsize=None)(gguf.GGUFReader), functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(gguf, "GGUFReader", lambda path, *a, **k: read(str(path), *a, **k)))
    stack.enter_context(mock.patch.object(gguf, "get_tensor_name_map", names))
    return stack


@contextlib.contextmanager
def _quiet():
    """Silence the libraries' own bars and warnings; qcompile reports progress itself."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its tqdm ignores transformers' switch

    transformers.utils.logging.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.export", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
              mock.patch.object(gguf_utils, "tqdm", lambda it, **_: it)):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _without_pair_rewrites():
    """Leave out onnxscript's SlicesSplit rule (two Slices of one tensor -> one Split) while the exporter optimizes.

    It matches pairs of nodes across the graph: 47 of the 133 s export of SmolLM2-135M, and it rewrote nothing
    there. Every other optimization (constant folding, the remaining rules) runs as before.
    """
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:  # another onnxscript: its defaults, whatever they cost
        return contextlib.nullcontext()
    kept = tuple(r for r in rules if getattr(r, "name", None) != "SlicesSplit")
    return mock.patch.object(rewriter, "_DEFAULT_REWRITE_RULES", kept)


def _canonical_linears(model) -> None:
    """Every linear as MatMul(x, W[K, N]) (+ Add(bias)) on the hidden states' own shape: a Gemm over flattened
    tokens (GPT-2's Conv1D, `addmm`) becomes one, and Reshapes that change no shape go."""
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        if node.op_type == "Reshape" and node.inputs[0].shape is not None and node.inputs[0].shape == node.outputs[0].shape \
                and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
    for gemm in list(graph):
        if gemm.op_type != "Gemm":
            continue
        a, w = gemm.attributes, gemm.inputs[1]
        if w.const_value is None or a.get_int("transA", 0) or \
                a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
            continue
        if a.get_int("transB", 0):
            tensor = _lazy_transpose(w.const_value, [1, 0])
            w = ir.Value(name=f"{w.name}_t", shape=tensor.shape, type=w.type, const_value=tensor)
            graph.register_initializer(w)
        x, out = gemm.inputs[0], gemm.outputs[0]
        flatten, uses = x.producer(), list(out.uses())
        if (flatten is not None and flatten.op_type == "Reshape" and len(uses) == 1 and uses[0].node.op_type == "Reshape"
                and (s3 := flatten.inputs[0].shape) is not None and uses[0].node.outputs[0].shape is not None
                and list(uses[0].node.outputs[0].shape) == [*s3[:-1], w.shape[1]]):
            x, out = flatten.inputs[0], uses[0].node.outputs[0]  # on [batch, seq, K] directly
        nodes = [ir.node("MatMul", [x, w], name=gemm.name)]
        if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
            nodes.append(ir.node("Add", [nodes[0].outputs[0], gemm.inputs[2]], name=f"{gemm.name}_bias"))
        for n in nodes:
            n.outputs[0].shape, n.outputs[0].type = out.shape, out.type
        graph.insert_before(gemm, nodes)
        out.replace_all_uses_with(nodes[-1].outputs[0])
    ir.passes.common.RemoveUnusedNodesPass()(model)


def _io_names(num_layers: int):
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _sliding_windows(config, layers: int) -> list[int]:
    """Each layer's attention window (0: attends to the whole past), as transformers masks it."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * layers
    return [window if kind == "sliding_attention" else 0 for kind in types[:layers]]


def _cache_shapes(model) -> list[tuple[int, int]]:
    """(kv heads, head size) of each layer's cache, read from one shape-only step of the model: configs spell them in
    many ways (num_key_value_heads, multi_query, n_head, head_dim) and some leave them implicit."""
    import torch

    from torch._subclasses.fake_tensor import FakeTensorMode

    attributes = {id(m): set(vars(m)) for m in model.modules()}
    with torch.no_grad(), _quiet(), FakeTensorMode(allow_non_fake_inputs=True):  # shapes only: no weight is read
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.int64), use_cache=True)
    for m in model.modules():  # tensors a module cached on its first call (Phi-3's long rotary frequencies) are fake
        for name in set(vars(m)) - attributes[id(m)]:
            if isinstance(vars(m)[name], torch.Tensor):
                delattr(m, name)
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in out.cache.layers]


def _unloaded_model(config):
    """The causal LM of `config` with uninitialised parameters (allocated, never written, so never resident: the
    export traces shapes and reads the weights from the checkpoint); its buffers (rotary frequencies, ...) are
    computed by its constructor, and the trace keeps them."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    with no_init_weights(), _quiet():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # part of the initialisation skipped above
    if "grouped_mm" in getattr(model, "get_experts_implementation", dict)().values():
        model.set_experts_implementation("batched_mm")  # grouped_mm is a custom op with no ONNX translation
    return model.eval()


def _aliases(model) -> dict[str, list[str]]:
    """Every parameter and buffer name -> all names of that tensor (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return {name: group for group in names.values() for name in group}


def _resolve_weights(model, shapes: dict) -> dict[str, str]:
    """Each parameter name, and each buffer name the checkpoint holds, -> the checkpoint name that holds it.
    Raises KeyError naming a parameter the checkpoint lacks or holds in another shape."""
    aliases, found = _aliases(model), {}
    for name, param in model.named_parameters(remove_duplicate=False):
        held = [a for a in aliases[name] if a in shapes]
        if not held or tuple(shapes[held[0]]) != tuple(param.shape):
            raise KeyError(f"{name} {tuple(param.shape)}" + (f" is {tuple(shapes[held[0]])} in the checkpoint" if held else ""))
        found[name] = held[0]
    for name, _ in model.named_buffers(remove_duplicate=False):
        found.update((name, a) for a in aliases[name][:1] if a in shapes)
    return found


def _open_checkpoint(source: Source, model):
    """(weights reader, {model name: checkpoint name}) for `source`; a checkpoint whose names or layout the
    streaming readers do not match (transformers renames it while loading, or pickled .bin weights) is loaded
    whole instead."""
    from qcompile import weights

    if source.kind == SourceKind.GGUF:
        reader = weights.GGUFWeights(source.path, model)
    elif any(source.path.glob("*.safetensors")):
        reader = weights.SafetensorsWeights(source.path)
    else:
        reader = None
    if reader is not None:
        try:
            return reader, _resolve_weights(model, reader.shapes())
        except KeyError as e:
            log.warning("the checkpoint does not hold %s under transformers' names: loading it whole to export it "
                        "(memory grows with the model)", e.args[0])
    loaded, _ = _load_hf(source)
    reader = weights.ModuleWeights(loaded)
    return reader, _resolve_weights(model, reader.shapes())


def export_source(source: Source, out_dir: pathlib.Path, progress=None) -> pathlib.Path:
    """Export a HF folder or GGUF file to `out_dir/model.onnx` without loading the model: the graph is traced
    with uninitialised weights and each initializer is written straight from the checkpoint. Returns that path.

    `out_dir` must exist and be empty (callers write into a temporary folder and rename it).
    """
    _require_export_deps()
    import transformers

    with _gguf_parsed_once():  # one parse of a GGUF file for the config, the tokenizer and the weights
        folder, kwargs = _hf_args(source)
        try:
            with _quiet():
                config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
            model = _unloaded_model(config)
        except Exception as e:
            raise _unreadable(source, e) from None
        reader, names = _open_checkpoint(source, model)
        tokenizer = _load_tokenizer(source)
    return _export(model, reader, names, out_dir, tokenizer, progress)


def export_model(model, out_dir: pathlib.Path, tokenizer=None, progress=None) -> pathlib.Path:
    """Export an in-memory HF causal LM to `out_dir/model.onnx` (traced as `export_source` does, its weights read
    from `model`); returns that path. `out_dir` must exist and be empty."""
    from qcompile import weights

    traced = _unloaded_model(model.config)
    reader = weights.ModuleWeights(model)
    return _export(traced, reader, _resolve_weights(traced, reader.shapes()), out_dir, tokenizer, progress)


def _trace_layers(model, cache_shapes):
    """The ONNXProgram of `model`'s KV-cache decoder, unoptimized (its parameters' initializers hold no values yet):
    where its layers repeat, a few of them traced and the rest cloned in the graph (`qcompile.repeat`)."""
    plan = repeat.plan(model)
    if plan is not None:
        try:
            few = _unloaded_model(repeat.traced_config(model.config, plan))
            repeat.check_traced(model, few, plan)
            program = _trace(few, cache_shapes[:plan.traced])
            repeat.repeat(program.model.graph, plan)
            return program
        except repeat.NotRepeatable as e:
            log.info("tracing all %d layers: %s", plan.layers, e)
    return _trace(model, cache_shapes)


def _trace(model, cache_shapes):
    """The ONNXProgram of `model`'s KV-cache decoder, every layer traced."""
    import torch
    from transformers import DynamicCache

    layers = len(cache_shapes)

    class KVDecoder(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, past):
            # no config: every layer keeps its whole past (a sliding-window layer masks it, as GQA's local window does)
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)])
            out = self.lm(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    # Past and new lengths get separate dims; the mask's length is a third (the exporter refuses Dim + Dim).
    batch, past_len, seq = 2, 3, 4
    ids = torch.zeros(batch, seq, dtype=torch.int64)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [torch.zeros(batch, heads, past_len, size) for heads, size in cache_shapes for _ in "kv"]
    bs = {0: "batch_size"}
    dynamic = (
        {**bs, 1: "sequence_length"},
        {**bs, 1: "total_sequence_length"},
        {**bs, 1: "sequence_length"},
        [{**bs, 2: "past_sequence_length"}] * (2 * layers),
    )
    inputs, outputs = _io_names(layers)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            KVDecoder(model).eval(), (ids, mask, pos, past), input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
        )
    return program


@dataclasses.dataclass(frozen=True)
class _Read:
    """The function of an initializer's LazyTensor: reads checkpoint tensor `key` as `dtype`, transposed by `perm`."""

    reader: object
    key: str
    dtype: object  # numpy dtype
    perm: tuple[int, ...] | None = None

    def __call__(self):
        import onnx_ir as ir

        return ir.tensor(self.reader.read(self.key, self.perm).astype(self.dtype, copy=False))


def _bind(graph, reader, names: dict) -> None:
    """Give each initializer the checkpoint holds its value as a lazy tensor, read when it is written, one at a
    time, never held. The others (buffers the constructor computed, tensors the model's code made) keep their
    traced values."""
    import onnx_ir as ir

    prefix = "lm."  # the KVDecoder wrapper's attribute
    for value in graph.initializers.values():
        key = names.get(value.name.removeprefix(prefix))
        if key is not None:
            dtype = value.const_value.dtype
            value.const_value = ir.LazyTensor(_Read(reader, key, dtype.numpy()), dtype=dtype,
                                              shape=value.const_value.shape, name=value.name)


def _lazy_transpose(tensor, perm):
    """`tensor` transposed by `perm`, computed when it is written (a checkpoint tensor is transposed as it is read)."""
    import numpy as np
    import onnx_ir as ir

    perm = tuple(perm)
    shape = ir.Shape([tensor.shape[p] for p in perm])
    if isinstance(tensor, ir.LazyTensor) and isinstance(tensor.raw, _Read) and tensor.raw.perm is None:
        return ir.LazyTensor(dataclasses.replace(tensor.raw, perm=perm), dtype=tensor.dtype, shape=shape)
    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(tensor.numpy().transpose(perm))),
                         dtype=tensor.dtype, shape=shape)


def _fold_weight_transposes(graph) -> None:
    """Transpose(W) of an initializer W read by nothing else becomes a transposed initializer, lazily (the
    optimizer folds these, but would hold every weight in memory to do it)."""
    import onnx_ir as ir

    for node in list(graph):
        w = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if w is None or not w.is_initializer() or len(w.uses()) != 1:
            continue
        perm = node.attributes.get_ints("perm", list(reversed(range(len(w.shape)))))
        tensor = _lazy_transpose(w.const_value, perm)
        folded = ir.Value(name=node.outputs[0].name, shape=tensor.shape, type=w.type, const_value=tensor)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(w.name)
        node.outputs[0].name = None
        graph.register_initializer(folded)


def _optimize(program) -> None:
    """torch's own `optimize=True` (onnxscript's optimizer and fusions), without its pair rule (see
    `_without_pair_rewrites`) and deduplicating only small constants: hashing every weight would read the
    whole checkpoint once more."""
    import onnx_ir as ir

    dedup = functools.partial(ir.passes.common.DeduplicateInitializersPass, size_limit=DEDUP_LIMIT)
    with _without_pair_rewrites(), mock.patch.object(ir.passes.common, "DeduplicateInitializersPass", dedup):
        program.optimize()


def _export(model, reader, names: dict, out_dir: pathlib.Path, tokenizer, progress) -> pathlib.Path:
    import onnx_ir as ir

    config = model.config
    traced = progress.task("Tracing the model (torch.onnx, dynamo)", 1) if progress else (lambda: None)
    cache_shapes = _cache_shapes(model)
    layers = len(cache_shapes)
    program = _trace_layers(model, cache_shapes)
    _bind(program.model.graph, reader, names)
    _fold_weight_transposes(program.model.graph)
    with _quiet():
        _optimize(program)
    traced()
    ir_model = program.model
    _canonical_linears(ir_model)
    windows = _sliding_windows(config, layers)
    if any(windows):  # the graph masks these layers to their last `window` positions; a fused attention must too
        ir_model.metadata_props[SLIDING_WINDOWS_KEY] = json.dumps(windows)  # read by analysis
    for value in ir_model.graph.outputs[1:]:  # "past_sequence_length + sequence_length" reads badly
        value.shape = value.shape.__class__([*value.shape[:2], "total_sequence_length", value.shape[3]])
    ir_model.producer_name = "qcompile"

    path = out_dir / MODEL_FILE
    external = sum(v.const_value.nbytes > _INLINE_BYTES for v in ir_model.graph.initializers.values())
    advance = progress.task("Writing the weights", external) if progress else None
    ir.save(ir_model, path, external_data=DATA_FILE, size_threshold_bytes=_INLINE_BYTES,
            callback=(lambda *_: advance()) if advance else None)
    hf_config = config.to_dict()
    hf_config.pop("quantization_config", None)  # the GGUF loader's marker; the export is plain fp32
    hf_config["dtype"] = "float32"  # the export's, whatever the checkpoint's
    # the shape under the names qcompile and onnxruntime-genai read, however the family spells it (n_head, n_positions,
    # multi_query, ...): the cache's own heads and head size, as exported
    kv_heads, head_dim = cache_shapes[0]
    hf_config.update(num_hidden_layers=layers, num_key_value_heads=kv_heads, head_dim=head_dim,
                     **{key: getattr(config, key) for key in ("num_attention_heads", "hidden_size", "max_position_embeddings")
                        if getattr(config, key, None) is not None})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return path
