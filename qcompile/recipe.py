"""Recipes: everything that decides what a compile produces, as one frozen, versioned dataclass tree.

    recipe = resolve("ort-int4", "my-recipe.toml", {"algo": "gptq"})
    print(to_toml(recipe))

`resolve` is the one place options meet: the target's defaults, then a recipe file (TOML, JSON, or an
artifact's manifest.json, whose `recipe` section has this same form), then explicit options (the CLI's
and `compile`'s keyword names), then the defaults that follow from other choices (e.g. the clip of int4
activations), all validated before any work. Every artifact's manifest carries the resolved recipe, so
`qcompile model SRC --recipe ART/manifest.json` rebuilds ART.

Run options that do not change the model's numbers (output folder, evaluation windows, engine build,
resume) are not part of a recipe.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import pathlib
import sys
import types
import typing

from qcompile import errors
from qcompile.calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN
from qcompile.schemes import LM_HEAD_INT4_GROUP, ActivationKind, ActivationScheme, Algorithm, WeightScheme

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VERSION = 1
DEFAULT_TARGET = "ort-int4"
# The clip ratio of per-token int4 activations when none is given. Measured on SmolLM2, rotated, GPTQ weights,
# 8 windows (ppl × float): clip 0.65 1.83, 0.7 1.69, 0.75 1.58, 0.8 1.66, 1.0 worse than all (RTN: 3.98 against 3.22).
INT4_CLIP = 0.75
# When the only calibrated step is a 4-bit lm_head's GPTQ: its one Hessian has settled by then (SmolLM2
# ort-int4, 32 windows: 33.94 / 33.72 / 33.90 perplexity from 8 / 32 / 128 samples) at a quarter of the time.
LM_HEAD_SAMPLES = 32


class GPTQMode(str, enum.Enum):
    PARALLEL = "parallel"  # every Hessian from the float model
    SEQUENTIAL = "sequential"  # each block's Hessians on the model whose earlier blocks are quantized


class NormRotation(str, enum.Enum):
    RESIDUAL = "residual"  # QuaRot: γ into the readers, the residual stream rotated offline
    SMOOTHED = "smoothed"  # each norm output scaled per channel, then an online Hadamard (calibrated)


@dataclasses.dataclass(frozen=True)
class Weights:
    """The block linears' weights. group_size 0: one scale per output channel. See `schemes.WeightScheme`."""

    algorithm: Algorithm = Algorithm.RTN
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    positive_scales: bool = False  # TensorRT needs symmetric scales > 0; ORT's signed full range is more accurate
    fp8: bool = False  # 8-bit weights as FP8 E4M3, per output channel
    act_order: bool = False  # GPTQ: visit channels by decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ: Hessian damping
    gptq_mode: GPTQMode = GPTQMode.PARALLEL
    skip: tuple[str, ...] = ()  # ModelMap names kept float, e.g. "blocks.0.down"
    layers: tuple[str, ...] = ()  # per-linear formats, "blocks.3.down=int8" (`schemes.parse_format`; a search's choice)


@dataclasses.dataclass(frozen=True)
class LmHead:
    bits: int | None = 8  # None: float; 4: GPTQ in groups of `group_size` (calibrated)
    group_size: int = LM_HEAD_INT4_GROUP  # a 4-bit lm_head's (an 8-bit one takes the weights' group size)


@dataclasses.dataclass(frozen=True)
class Embeddings:
    bits: int | None = None  # None: float; 4 or 8 (ONNX Runtime's GatherBlockQuantized)


@dataclasses.dataclass(frozen=True)
class Rotation:
    """QuaRot's rotations: the norm outputs (`norm_outputs`), each value head, an online Hadamard before
    down_proj; with `attention_hadamards` also before o_proj and on the post-RoPE queries and keys."""

    enabled: bool = False
    seed: int = 0
    norm_outputs: NormRotation = NormRotation.RESIDUAL
    attention_hadamards: bool = False


@dataclasses.dataclass(frozen=True)
class KVCache:
    bits: int | None = None  # None: float; 4 or 8, symmetric, a calibrated scale per KV head and channel


@dataclasses.dataclass(frozen=True)
class Calibration:
    file: str | None = None  # a text or JSONL file; None: the packaged WikiText-2 valid.txt
    samples: int = DEFAULT_SAMPLES
    seqlen: int = DEFAULT_SEQLEN  # at most the model's context


@dataclasses.dataclass(frozen=True)
class Lowering:
    accuracy_level: int = 4  # ORT MatMulNBits: 0 fp32 compute, 4 int8 activations per block
    fuse: bool = True  # ORT: GroupQueryAttention and (Skip)SimplifiedLayerNormalization fusions


@dataclasses.dataclass(frozen=True)
class Recipe:
    target: str
    weights: Weights = Weights()
    lm_head: LmHead = LmHead()
    embeddings: Embeddings = Embeddings()
    activations: ActivationScheme = ActivationScheme()
    rotation: Rotation = Rotation()
    kv_cache: KVCache = KVCache()
    calibration: Calibration = Calibration()
    lowering: Lowering = Lowering()
    version: int = VERSION

    def weight_scheme(self) -> WeightScheme:
        """What the weight-quantization passes read: the block linears' scheme with lm_head's and the embedding's widths."""
        w = self.weights
        return WeightScheme(bits=w.bits, group_size=w.group_size, symmetric=w.symmetric, algorithm=w.algorithm,
                            lm_head_bits=self.lm_head.bits, skip=w.skip, act_order=w.act_order, damp=w.damp,
                            sequential=w.gptq_mode == GPTQMode.SEQUENTIAL, positive_scales=w.positive_scales,
                            embedding_bits=self.embeddings.bits, fp8=w.fp8, lm_head_group_size=self.lm_head.group_size,
                            layers=w.layers)

    @property
    def head_calibrated(self) -> bool:
        """A 4-bit lm_head is GPTQ's even when the block linears are not (RTN, AWQ): it needs calibration."""
        return self.lm_head.bits == 4 and "lm_head" not in self.weights.skip and self.weights.algorithm in (Algorithm.RTN, Algorithm.AWQ)

    @property
    def body_calibrated(self) -> bool:
        a = self.activations
        smoothed = self.rotation.enabled and self.rotation.norm_outputs == NormRotation.SMOOTHED
        kv = self.kv_cache.bits is not None  # its static scales
        return self.weights.algorithm != Algorithm.RTN or a.smoothquant or a.static or smoothed or kv

    @property
    def calibrated(self) -> bool:
        return self.body_calibrated or self.head_calibrated


SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name not in ("target", "version"))
_SECTION_TYPES = {name: cls for name, cls in typing.get_type_hints(Recipe).items() if name in SECTIONS}

# compile()'s keyword options and the CLI's, as recipe fields. None means "not given" except for the
# fields where None is itself a value (float widths, α searched per layer).
OPTIONS = {
    "algo": ("weights", "algorithm"), "bits": ("weights", "bits"), "group_size": ("weights", "group_size"),
    "symmetric": ("weights", "symmetric"), "positive_scales": ("weights", "positive_scales"),
    "act_order": ("weights", "act_order"), "gptq_mode": ("weights", "gptq_mode"), "skip": ("weights", "skip"),
    "layers": ("weights", "layers"),
    "lm_head_bits": ("lm_head", "bits"), "lm_head_group_size": ("lm_head", "group_size"), "embedding_bits": ("embeddings", "bits"),
    "activations": ("activations", "kind"), "activation_clip": ("activations", "clip"),
    "smoothquant": ("activations", "smoothquant"), "smooth_up_down": ("activations", "smooth_up_down"),
    "alpha": ("activations", "alpha"), "float_inputs": ("activations", "float_inputs"),
    "rotate": ("rotation", "enabled"), "rotation_seed": ("rotation", "seed"), "rotation": ("rotation", "norm_outputs"),
    "attention_hadamards": ("rotation", "attention_hadamards"),
    "kv_cache_bits": ("kv_cache", "bits"),
    "calib": ("calibration", "file"), "calib_samples": ("calibration", "samples"), "calib_seqlen": ("calibration", "seqlen"),
    "accuracy_level": ("lowering", "accuracy_level"), "fuse": ("lowering", "fuse"),
}
NULLABLE = {"lm_head_bits", "embedding_bits", "kv_cache_bits", "alpha"}
# What an error calls a field (the option's name in words).
_NAMES = {"weights.algorithm": "algorithm", "weights.gptq_mode": "GPTQ mode", "activations.kind": "activation scheme",
          "rotation.norm_outputs": "rotation"}
# How None is written in a file (TOML has no null): a float width, α searched per layer.
_NONE_WORDS = {"bits": "float", "alpha": "auto"}


def resolve(target: str | None, file: str | pathlib.Path | dict | Recipe | None = None, overrides: dict | None = None) -> Recipe:
    """The recipe of a compile: the defaults of `target` (else the file's target, else ort-int4), then
    `file` (a path, a parsed dict or a Recipe), then `overrides` (OPTIONS names; None = not given, except
    NULLABLE ones), then the defaults that follow from the other choices; validated, including the
    target's own rules."""
    from qcompile import targets  # the registry holds each target's defaults

    data = _read(file) if file is not None else {}
    tgt = targets.get(target or data.get("target") or DEFAULT_TARGET)
    fields = {section: {} for section in SECTIONS}
    given = _merge(fields, tgt.defaults, "target defaults")  # a target's default is a choice: nothing derives over it
    origin = str(file) if isinstance(file, (str, pathlib.Path)) else "recipe"
    given |= _merge(fields, {k: v for k, v in data.items() if k not in ("version", "target")}, origin)
    unknown = sorted(set(overrides or {}) - set(OPTIONS))
    if unknown:
        raise errors.InputError(f"unknown option(s) {', '.join(unknown)}: use {', '.join(OPTIONS)}")
    explicit = {OPTIONS[k]: v for k, v in (overrides or {}).items() if v is not None or k in NULLABLE}
    for (section, name), value in explicit.items():
        fields[section][name] = value
    given |= set(explicit)
    recipe = Recipe(tgt.name, **{s: _section(s, values) for s, values in fields.items()})
    recipe = _derive(recipe, given)
    _validate(recipe, explicit)
    tgt.validate(recipe)
    return recipe


def _read(file) -> dict:
    """A recipe as plain data from a Recipe, a dict, or a TOML/JSON file (an artifact's manifest too)."""
    if isinstance(file, Recipe):
        return to_dict(file)
    if isinstance(file, dict):
        data = file
    else:
        path = pathlib.Path(file)
        if not path.is_file():
            raise errors.SourceNotFoundError(f"recipe file '{path}' not found")
        try:
            data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise errors.InputError(f"recipe file '{path}' is not valid {'TOML' if path.suffix == '.toml' else 'JSON'} "
                                    f"({str(e).splitlines()[0]}): fix it, or print a valid one with `qcompile recipe`") from None
    if not isinstance(data, dict):
        raise errors.InputError("a recipe is a table of sections: print a valid one with `qcompile recipe`")
    if "recipe" in data and "qcompile_version" in data:  # an artifact's manifest
        data = data["recipe"]
    if data.get("version", VERSION) != VERSION:
        raise errors.InputError(f"recipe version {data.get('version')} is not {VERSION}: print a current one with `qcompile recipe`")
    return data


def _merge(fields: dict, sections: dict, origin: str) -> set[tuple[str, str]]:
    """Copy `sections` ({section: {field: value}}) into `fields`; returns the (section, field) pairs set."""
    set_here = set()
    for section, values in sections.items():
        if section not in SECTIONS:
            raise errors.InputError(f"{origin}: unknown recipe section [{section}]: use {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise errors.InputError(f"{origin}: [{section}] must be a table of fields")
        names = {f.name for f in dataclasses.fields(_SECTION_TYPES[section])} - {"version"}
        for name, value in values.items():
            if name not in names:
                raise errors.InputError(f"{origin}: unknown field {section}.{name}: use {', '.join(sorted(names))}")
            fields[section][name] = value
            set_here.add((section, name))
    return set_here


def _section(section: str, values: dict):
    """A section's dataclass from spelled values ("gptq", "float", [..]), checking each type."""
    cls = _SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    return cls(**{name: _value(f"{section}.{name}", hints[name], value) for name, value in values.items()})


def _value(where: str, hint, value):
    if value is None or (isinstance(value, str) and value == _NONE_WORDS.get(where.split(".")[1])):
        if type(None) in typing.get_args(hint):
            return None
        raise errors.InputError(f"{where} cannot be {value!r}: give a value")
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value.lower() if isinstance(value, str) else value)
        except ValueError:
            raise errors.InputError(f"unknown {_NAMES.get(where, where)} '{value}': use one of {', '.join(k.value for k in kind)}") from None
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise errors.InputError(f"{where} must be a list of names")
        return tuple(value)
    if kind is bool and not isinstance(value, bool):
        raise errors.InputError(f"{where} must be true or false, not {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise errors.InputError(f"{where} must be an integer, not {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise errors.InputError(f"{where} must be a number, not {value!r}")
        return float(value)
    if kind is str:
        return str(value)
    return value


def _derive(recipe: Recipe, given: set[tuple[str, str]]) -> Recipe:
    """Fill the fields whose default follows from other choices, unless a file or an option set them."""
    act, rot, cal = recipe.activations, recipe.rotation, recipe.calibration
    int4 = act.kind == ActivationKind.INT4_DYNAMIC
    if int4 and ("activations", "clip") not in given:
        act = dataclasses.replace(act, clip=INT4_CLIP)
    if rot.enabled:
        if ("rotation", "norm_outputs") not in given:
            rot = dataclasses.replace(rot, norm_outputs=NormRotation.SMOOTHED if int4 else NormRotation.RESIDUAL)
        if ("rotation", "attention_hadamards") not in given:
            rot = dataclasses.replace(rot, attention_hadamards=int4 or recipe.kv_cache.bits is not None)
    else:
        rot = Rotation(seed=rot.seed)
    recipe = dataclasses.replace(recipe, activations=act, rotation=rot)
    if ("calibration", "samples") not in given:
        cal = dataclasses.replace(cal, samples=DEFAULT_SAMPLES if recipe.body_calibrated else LM_HEAD_SAMPLES)
    return dataclasses.replace(recipe, calibration=cal)


def _validate(recipe: Recipe, explicit: dict[tuple[str, str], object]) -> None:
    """Every rule that does not depend on the target (the target checks its own in `Target.validate`);
    `explicit` holds the options given, for those that contradict each other."""
    w, rot, cal = recipe.weights, recipe.rotation, recipe.calibration
    recipe.weight_scheme()  # bits, group sizes, widths: WeightScheme raises naming the fix
    if recipe.lowering.accuracy_level not in (0, 1, 2, 3, 4):
        raise errors.InputError(f"accuracy level {recipe.lowering.accuracy_level} is not one of 0, 1, 2, 3, 4")
    if w.fp8 and w.algorithm != Algorithm.RTN:
        raise errors.InputError(f"FP8 weights are rounded to nearest: drop --algo {w.algorithm.value}")
    if recipe.kv_cache.bits not in (None, 4, 8):
        raise errors.InputError(f"KV-cache bits={recipe.kv_cache.bits} is not supported: use 4, 8 or float")
    if not rot.enabled and explicit.get(("rotation", "norm_outputs")) is not None:
        raise errors.InputError(f"--rotation {explicit[('rotation', 'norm_outputs')]} chooses among QuaRot's rotations: "
                                "add --rotate or drop --rotation")
    if not rot.enabled and explicit.get(("rotation", "attention_hadamards")):
        raise errors.InputError("attention Hadamards are part of QuaRot's rotations: add --rotate or drop --attention-hadamards")
    if cal.samples < 1 or cal.seqlen < 1:
        raise errors.InputError(f"calibration needs at least one window of one token (samples {cal.samples}, seqlen {cal.seqlen})")


def to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data (the manifest's `recipe` section; TOML and JSON files hold the same)."""
    out: dict = {"version": recipe.version, "target": recipe.target}
    for section in SECTIONS:
        values = {}
        for f in dataclasses.fields(getattr(recipe, section)):
            if f.name == "version":
                continue
            value = getattr(getattr(recipe, section), f.name)
            if value is None:
                if f.name not in _NONE_WORDS:
                    continue  # e.g. no calibration file: the packaged text
                value = _NONE_WORDS[f.name]
            elif isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            values[f.name] = value
        out[section] = values
    return out


def to_toml(recipe: Recipe) -> str:
    data = to_dict(recipe)
    lines = ["# qcompile recipe: `qcompile model SOURCE --recipe FILE` compiles with it", f"version = {data.pop('version')}",
             f"target = {_toml(data.pop('target'))}"]
    for section, values in data.items():
        lines += ["", f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
