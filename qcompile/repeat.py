"""Trace a few decoder layers and repeat them in the ONNX graph: the export's tracing time grows with the layers
(about 2 s per layer on 2 cores, 60 of SmolLM2-135M's 97 s export), and most models repeat one layer, or a short
period of layers (Gemma 2 alternates sliding and global attention), all the way down.

`plan(model)` finds the period P from structure: each layer's modules (types, scalar attributes), parameter shapes
and buffer values, and the config's per-layer lists (`layer_types`, `no_rope_layers`, ...), must repeat every P
layers. The export then traces T = 3P + ((L - 3P) mod P) layers: the first P trace apart (torch computes shared
shape arithmetic where it is first needed), the next P show every value a layer takes from the one before, the
last P are the template, and L - T is a multiple of P. `repeat(graph, plan)` checks that traced layers of one
phase (from the second period on) are node for node the same (ops, attributes, constants), clones the
template's nodes for layers T..L-1 (their parameters, past and present renamed, the hidden state carried from
the layer before), and moves what read the last traced layers (the final norm) to the last layers. Anything it
cannot place is a `NotRepeatable`: the export then traces every layer, as before.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re

_SCOPES = "pkg.torch.onnx.name_scopes"
_PREFIX = "lm."  # the KV decoder wrapper's attribute (export._trace)


class NotRepeatable(Exception):
    """The traced layers cannot be repeated; the export traces every layer instead."""


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str  # the ModuleList of decoder layers, e.g. "model.layers"
    period: int  # P
    traced: int  # T
    layers: int  # L


def _layer_list(model) -> str | None:
    import torch

    layers = getattr(model.config, "num_hidden_layers", None)
    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    return found[0] if len(found) == 1 else None


def _signature(layer) -> str:
    """What makes two layers trace alike: module types and scalar attributes (its index aside), parameter shapes,
    buffer values."""
    import torch

    h = hashlib.sha256()
    for name, m in layer.named_modules():
        scalars = sorted((k, repr(v)) for k, v in vars(m).items()
                         if not k.startswith("_") and k != "layer_idx" and isinstance(v, (bool, int, float, str, type(None))))
        h.update(repr((name, type(m).__qualname__, scalars)).encode())
    for name, p in layer.named_parameters():
        h.update(repr((name, tuple(p.shape), str(p.dtype))).encode())
    for name, b in layer.named_buffers():
        h.update(repr((name, tuple(b.shape), str(b.dtype))).encode())
        if b.device.type == "cpu" and not b.is_meta:
            h.update(b.detach().to(torch.float64 if b.is_floating_point() else b.dtype).contiguous().numpy().tobytes())
    return h.hexdigest()


def _per_layer_lists(config, layers: int) -> dict[str, list]:
    return {k: v for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == layers}


def plan(model) -> Plan | None:
    """How to export `model` from a few traced layers, or None when its layers do not repeat (or too few do)."""
    path = _layer_list(model)
    if path is None:
        return None
    blocks = model.get_submodule(path)
    layers = len(blocks)
    signatures = [_signature(b) for b in blocks]
    lists = _per_layer_lists(model.config, layers)
    for period in range(1, layers // 3 + 1):
        if all(signatures[i] == signatures[i % period] for i in range(layers)) and \
                all(v[i] == v[i % period] for v in lists.values() for i in range(layers)):
            traced = 3 * period + (layers - 3 * period) % period
            return Plan(path, period, traced, layers) if traced < layers else None
    return None


def traced_config(config, p: Plan):
    """`config` cut to the plan's traced layers (per-layer lists included)."""
    small = copy.deepcopy(config)
    for key, value in _per_layer_lists(config, p.layers).items():
        setattr(small, key, type(value)(value[:p.traced]))
    small.num_hidden_layers = p.traced
    return small


def check_traced(model, small, p: Plan) -> None:
    """The traced model's layers are the first T of `model`'s."""
    big, few = model.get_submodule(p.path), small.get_submodule(p.path)
    if [_signature(b) for b in few] != [_signature(b) for b in list(big)[:p.traced]]:
        raise NotRepeatable("the cut model's layers differ from the first layers of the whole model")


# ---------------------------------------------------------------------------------------------------------------
# The graph


def _past_index(value) -> int | None:
    m = re.fullmatch(r"(?:past_key_values|present)\.(\d+)\.(?:key|value)", value.name or "")
    return int(m.group(1)) if m else None


class _Layers:
    """Which traced layer each node computes: its torch module scope, or, for a node outside every module (shape
    arithmetic, the cache's reads of `past_key_values.N`), the one layer all its readers are in."""

    def __init__(self, graph, p: Plan):
        scope = re.compile(r"^" + re.escape(_PREFIX + p.path) + r"\.(\d+)$")
        self.of: dict[int, int] = {}  # id(node) -> layer
        self.scoped: list[list] = [[] for _ in range(p.traced)]  # each layer's scoped non-Constant nodes, in order
        for node in graph:
            found = {int(m.group(1)) for s in _scopes(node) if (m := scope.match(s))}
            if len(found) == 1:
                layer = found.pop()
                self.of[id(node)] = layer
                if node.op_type != "Constant":
                    self.scoped[layer].append(node)
        for node in reversed(list(graph)):  # readers first, so that chains of shape arithmetic follow their reader
            if id(node) in self.of or node.op_type == "Constant":
                continue
            readers = {self.of.get(id(u.node), -1) for o in node.outputs for u in o.uses()}
            readers |= {_past_index(o) for o in node.outputs if o.is_graph_output()}
            if len(readers) == 1 and (layer := readers.pop()) not in (-1, None):
                self.of[id(node)] = layer


def _scopes(node) -> list[str]:
    text = node.metadata_props.get(_SCOPES, "")
    return re.findall(r"'([^']*)'", text)


def _attributes(node) -> dict:
    def key(value):
        return (value.dtype, tuple(value.shape), value.numpy().tobytes()) if hasattr(value, "numpy") else repr(value)

    return {k: key(v.value) for k, v in node.attributes.items()}


def _same(a, b, layer_a: int, layer_b: int, path: str) -> bool:
    """Nodes `a` (of layer_a) and `b` (of layer_b) compute alike: op, attributes, constant and parameter inputs."""
    if (a.domain, a.op_type, a.overload, len(a.inputs), len(a.outputs)) != (b.domain, b.op_type, b.overload, len(b.inputs), len(b.outputs)):
        return False
    if any(attr.type.name in ("GRAPH", "GRAPHS") for attr in a.attributes.values()):
        return False
    if _attributes(a) != _attributes(b):
        return False
    for x, y in zip(a.inputs, b.inputs):
        if (x is None) != (y is None):
            return False
        if x is None:
            continue
        px, py = x.producer(), y.producer()
        if px is not None and px.op_type == "Constant" or py is not None and py.op_type == "Constant":
            if px is None or py is None or _attributes(px) != _attributes(py):
                return False
        if x.is_initializer() or y.is_initializer():
            rename = f"{_PREFIX}{path}.{layer_a}.", f"{_PREFIX}{path}.{layer_b}."
            if not (x.is_initializer() and y.is_initializer()) or (x.name or "").replace(*rename) != y.name:
                return False
    return True


def repeat(graph, p: Plan) -> None:
    """Clone the template layers of the traced `graph` into layers T..L-1, in place (see the module docstring)."""
    import onnx_ir as ir

    layers = _Layers(graph, p)
    scoped = layers.scoped
    for i in range(p.period, p.traced - p.period):  # one phase, one node list (the first layers trace apart)
        if len(scoped[i]) != len(scoped[i + p.period]) or \
                not all(_same(a, b, i, i + p.period, p.path) for a, b in zip(scoped[i], scoped[i + p.period])):
            raise NotRepeatable(f"traced layers {i} and {i + p.period} differ")
    position = {id(n): (layer, k) for layer, nodes in enumerate(scoped) for k, n in enumerate(nodes)}
    template = [[n for n in graph if layers.of.get(id(n)) == t] for t in range(p.traced)]
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}

    others = [n for n in graph if id(n) not in layers.of]  # the embedding, the mask, the final norm, lm_head
    made: dict[int, list] = {}  # new layer -> its scoped nodes' clones, in order (to find carried values)

    def scoped_node(layer: int, k: int):
        return scoped[layer][k] if layer < p.traced else made[layer][k]

    layer_prefix = f"{_PREFIX}{p.path}."
    free: dict[int, bool] = {}

    def data_free(value) -> bool:
        """`value` is the same in every layer: it reads no layer's parameters or past, only shapes, constants and
        the model's inputs (shape arithmetic torch computed once, in whichever layer first needed it)."""
        stack = [value]  # depth first without recursion: a hidden state's producers go back through every layer
        while stack:
            v = stack[-1]
            node = v.producer()
            if id(v) in free:
                stack.pop()
            elif v.is_initializer():
                free[id(v)] = not (v.name or "").startswith(layer_prefix)
            elif node is None:
                free[id(v)] = _past_index(v) is None
            elif node.op_type in ("Shape", "Constant"):
                free[id(v)] = True
            elif pending := [x for x in node.inputs if x is not None and id(x) not in free]:
                stack.extend(pending)
            else:
                free[id(v)] = all(free[id(x)] for x in node.inputs if x is not None)
        return free[id(value)]

    for new in range(p.traced, p.layers):
        t = p.traced - p.period + (new - p.traced) % p.period
        mapping: dict[int, object] = {}
        rename = f"{_PREFIX}{p.path}.{t}.", f"{_PREFIX}{p.path}.{new}."
        clones = {}
        for node in template[t]:
            args = []
            for x in node.inputs:
                if x is None or id(x) in mapping:
                    args.append(mapping.get(id(x)) if x is not None else None)
                    continue
                src = x.producer()
                if x.is_initializer():
                    name = x.name.replace(*rename)
                    if name not in graph.initializers:
                        graph.register_initializer(ir.Value(name=name, shape=x.shape, type=x.type, const_value=x.const_value))
                    args.append(graph.initializers[name])
                elif src is None and _past_index(x) is not None:
                    if _past_index(x) != t:
                        raise NotRepeatable(f"layer {t} reads {x.name}")
                    name = x.name.replace(f".{t}.", f".{new}.")
                    if name not in inputs:
                        inputs[name] = ir.Value(name=name, shape=x.shape, type=x.type)
                        graph.inputs.append(inputs[name])
                    args.append(inputs[name])
                elif src is None or data_free(x):
                    args.append(x)  # shared: the model's inputs, constants, shape arithmetic
                elif id(src) in position and position[id(src)][0] >= p.traced - 2 * p.period:
                    layer, k = position[id(src)]  # carried from a layer before (the hidden state)
                    args.append(scoped_node(new - (t - layer), k).outputs[x.index()])
                else:
                    raise NotRepeatable(f"layer {t} reads {x.name}, computed apart from the layers before it")
            clone = ir.Node(node.domain, node.op_type, args, attributes=list(node.attributes.values()),
                            overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                            name=f"{node.name}_l{new}" if node.name else None,
                            metadata_props={k: v.replace(rename[0][:-1], rename[1][:-1]) for k, v in node.metadata_props.items()})
            for old, out in zip(node.outputs, clone.outputs):
                out.name = f"{old.name}_l{new}" if old.name else None
                out.shape, out.type = old.shape, old.type
                mapping[id(old)] = out
                if old.is_graph_output():
                    out.name = old.name.replace(f".{t}.", f".{new}.")
                    outputs[out.name] = out
            clones[id(node)] = clone
            graph.append(clone)
        made[new] = [clones[id(n)] for n in scoped[t]]
    shift = p.layers - p.traced  # a multiple of P: the last layers' phase is the last traced ones'
    for node in others:  # what read the last traced layers reads the last layers
        for i, x in enumerate(node.inputs):
            src = x.producer() if x is not None else None
            if src is not None and id(src) in position and position[id(src)][0] >= p.traced - p.period:
                layer, k = position[id(src)]
                node.replace_input_with(i, scoped_node(layer + shift, k).outputs[x.index()])
    presents = [outputs[f"present.{i}.{kv}"] for i in range(p.layers) for kv in ("key", "value")]
    logits = graph.outputs[0]
    graph.outputs.clear()
    graph.outputs.extend([logits, *presents])
    graph.sort()
