"""Export a Hugging Face causal LM to an ONNX KV-cache decoder with `torch.onnx.export(dynamo=True)`.

The graph follows the I/O names onnxruntime-genai expects:

    input_ids [b, s], attention_mask [b, past + s], position_ids [b, s],
    past_key_values.N.key/.value [b, kv_heads, past, head_dim]
      -> logits [b, s, vocab], present.N.key/.value [b, kv_heads, past + s, head_dim]

Weights are fp32 initializers saved as external data (`model.onnx.data`) so that they are memory-mapped
on load and models past 2 GB work. torch and transformers are imported only here (the `export` extra).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import pathlib
import warnings
from unittest import mock

from qcompile import errors
from qcompile.analysis import SLIDING_WINDOWS_KEY
from qcompile.sources import Source, SourceKind

EXPORT_FORMAT = 2  # bumped when the exported graph or its files change: cached exports of older formats are redone
OPSET = 21  # blocked DequantizeLinear (the canonical int4 form) needs opset 21
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
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
    """Load (model, tokenizer) from a HF folder or GGUF file, in fp32 and eval mode."""
    _require_export_deps()
    with _gguf_parsed_once():
        return _load_hf(source)


def _load_hf(source: Source):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if source.kind == SourceKind.GGUF:
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
        folder, kwargs = source.path.parent, {"gguf_file": source.path.name}
    else:
        folder, kwargs = source.path, {}
    try:
        with _quiet():
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except Exception as e:  # a user's file: whatever transformers raises, the fix is in the input
        raise errors.CorruptModelError(
            f"cannot load '{source.path}' as a causal LM ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
            "check that the file is complete and is a supported text model"
        ) from None
    # A weights-only folder still compiles; evaluation then asks for tokenizer.json. (Without tokenizer
    # files transformers may build an empty tokenizer instead of failing, so look for the files first.)
    tokenizer = None
    if source.kind == SourceKind.GGUF or any((folder / f).is_file() for f in _TOKENIZER_FILES):
        try:
            with _quiet():
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
        except Exception:
            tokenizer = None
    return model.eval(), tokenizer


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
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its tqdm ignores transformers' switch

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
    import numpy as np
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
            array = np.ascontiguousarray(w.const_value.numpy().T)
            w = ir.Value(name=f"{w.name}_t", shape=ir.Shape(array.shape), type=w.type, const_value=ir.tensor(array))
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
    """(kv heads, head size) of each layer's cache, read from one step of the model: configs spell them in
    many ways (num_key_value_heads, multi_query, n_head, head_dim) and some leave them implicit."""
    import torch

    with torch.no_grad(), _quiet():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.int64), use_cache=True)
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in out.cache.layers]


def export_model(model, out_dir: pathlib.Path, tokenizer=None) -> pathlib.Path:
    """Export an in-memory HF causal LM to `out_dir/model.onnx`; returns that path.

    `out_dir` must exist and be empty (callers write into a temporary folder and rename it).
    """
    import torch
    from transformers import DynamicCache

    config = model.config
    if "grouped_mm" in getattr(model, "get_experts_implementation", dict)().values():
        model.set_experts_implementation("batched_mm")  # grouped_mm is a custom op with no ONNX translation
    cache_shapes = _cache_shapes(model)
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
    ids = torch.randint(0, min(config.vocab_size, 1000), (batch, seq))
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
    with _quiet(), _without_pair_rewrites(), torch.no_grad():
        program = torch.onnx.export(
            KVDecoder(model).eval(), (ids, mask, pos, past), input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
        )
    ir_model = program.model
    _canonical_linears(ir_model)
    windows = _sliding_windows(config, layers)
    if any(windows):  # the graph masks these layers to their last `window` positions; a fused attention must too
        ir_model.metadata_props[SLIDING_WINDOWS_KEY] = json.dumps(windows)  # read by analysis
    for value in ir_model.graph.outputs[1:]:  # "past_sequence_length + sequence_length" reads badly
        value.shape = value.shape.__class__([*value.shape[:2], "total_sequence_length", value.shape[3]])
    ir_model.producer_name = "qcompile"
    import onnx_ir as ir

    path = out_dir / MODEL_FILE
    ir.save(ir_model, path, external_data=DATA_FILE)
    hf_config = config.to_dict()
    hf_config.pop("quantization_config", None)  # the GGUF loader's marker; the export is plain fp32
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
