"""Fidelity: every target stores the same quantized integers and scales, and we can prove it.

A reader (the target that wrote a model: anything with `forms` (what its own ops stand for, to analyze the
model), `read_weight(linear)`, `read_embedding(gather)` and `read_expert_table(table)`) reads each quantized
weight back from its own lowered form, or the canonical one, into the canonical
arrays (`Decoded`). `digests` hashes them per linear; the compiler records the digests of the canonical
model before lowering, and `verify` checks an artifact against them (and against another artifact: same
integers, then both run through ONNX Runtime on the same prompt).
"""

from __future__ import annotations

import pathlib
from typing import Iterator, Protocol

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors, targets
from qcompile.analysis import Linear
from qcompile.passes._canonical import Decoded

PROMPT = "The history of the city began in the early nineteenth century, when a group of settlers"
# Different kernels of the same weights may flip a few argmaxes: MatMulNBits at accuracy_level 4 rounds its
# input to int8 per block, so last-bit differences upstream (a fused norm or attention) change that rounding.
# Measured on SmolLM2's 17-token prompt: ort-int4 fused vs unfused, 15 of 17 agree at accuracy_level 4 (max
# |Δlogit| 2.8) and all 17 at accuracy_level 0 (max |Δlogit| 5e-5). A broken lowering agrees on almost none.
MIN_ARGMAX_AGREEMENT = 0.8


class Reader(Protocol):
    """Reads a target's stored weights back as canonical arrays (a Target, or `passes._canonical`)."""

    forms: analysis.LoweredForms

    def read_weight(self, linear: Linear) -> Decoded | None: ...

    def read_embedding(self, gather: ir.Node) -> Decoded | None: ...

    def read_expert_table(self, table: analysis.ExpertTable) -> Decoded | None: ...


def _decoded(model: ir.Model, reader: Reader) -> Iterator[tuple[str, Decoded]]:
    """(name, Decoded) for every quantized linear (ModelMap names: 'blocks.3.q', 'lm_head'; a fused projection's
    parts each by its own name, as a target may fuse or not), expert table
    ('blocks.3.experts.0') and the embedding table ('embedding') when it is quantized, decoded one at a time."""
    mm = analysis.analyze(model, reader.forms)
    for linear in (view for lin in mm.linears() for view in lin.views()):  # fused or not, as a target stores it
        decoded = reader.read_weight(linear)
        if decoded is not None:
            yield linear.name, decoded
    for table in mm.expert_tables():
        decoded = reader.read_expert_table(table)
        if decoded is not None:
            yield table.name, decoded
    embedding = reader.read_embedding(mm.embedding)
    if embedding is not None:
        yield "embedding", embedding


def _fingerprints(model: ir.Model, reader: Reader) -> dict[str, tuple[str, str]]:
    """name → (digest, tensor holding the integers), holding one decoded weight at a time."""
    return {name: (d.digest(), d.tensor) for name, d in _decoded(model, reader)}


def digests(model: ir.Model, reader: Reader) -> dict[str, str]:
    """name → digest of every quantized weight as `reader` reads it, holding one decoded weight at a time."""
    return {name: digest for name, (digest, _) in _fingerprints(model, reader).items()}


def compare_digests(expected: dict[str, str], model: ir.Model, reader: Reader) -> list[str]:
    """Problems with `model`'s quantized weights (as `reader` reads them) against `expected` digests, one line
    each, naming the linear and the tensor; empty when bit-identical."""
    return _problems(expected, _fingerprints(model, reader))


def _problems(expected: dict[str, str], found: dict[str, tuple[str, str]]) -> list[str]:
    problems = [f"{name}: quantized weights missing (a weight DequantizeLinear folded back to float? never run "
                "onnxsim or ORT offline optimisation on an artifact)" for name in sorted(set(expected) - set(found))]
    problems += [f"{name}: quantized here but not in the reference ({found[name][1]})"
                 for name in sorted(set(found) - set(expected))]
    problems += [f"{name}: integers or scales differ from the reference in tensor {found[name][1]}"
                 for name in sorted(set(expected) & set(found)) if found[name][0] != expected[name]]
    return problems


def compare_logits(a: pathlib.Path, b: pathlib.Path, prompt: str = PROMPT) -> dict:
    """Run both models on `prompt` with ONNX Runtime: max |Δlogits| and argmax agreement per position.
    Without a tokenizer beside `a`, fixed token ids 1..16 stand in for the prompt."""
    from qcompile.runtime import Decoder, load_tokenizer

    has_tokenizer = (a.parent / "tokenizer.json").is_file()
    ids = np.array([load_tokenizer(a.parent).encode(prompt).ids if has_tokenizer else list(range(1, 17))])
    logits = []
    for path in (a, b):
        decoder = Decoder(path)
        logits.append(decoder.forward(ids, decoder.empty_cache(), 0)[0][0])
    return {"tokens": int(ids.shape[1]),
            "max_abs_logit_diff": float(np.abs(logits[0] - logits[1]).max()),
            "argmax_agreement": float((logits[0].argmax(-1) == logits[1].argmax(-1)).mean())}


def verify_all(paths: list[str | pathlib.Path]) -> dict:
    """`verify` of the first artifact against each of the others (artifacts of one canonical model, e.g. from
    `compile_many`): one report, passed when every pair holds the same integers and scales."""
    reports = [verify(paths[0], other) for other in paths[1:]] or [verify(paths[0])]
    return {"artifacts": [str(p) for p in paths], "pairs": reports, "passed": all(r["passed"] for r in reports)}


def verify(path: str | pathlib.Path, against: str | pathlib.Path | None = None) -> dict:
    """Check an artifact's weights against the digests its compile recorded and, with `against`, against
    another artifact's weights and logits. Returns the report; `report['passed']` is the verdict."""
    from qcompile.artifact import Artifact, load_onnx

    art = Artifact.load(path)
    expected = art.manifest.get("fidelity", {}).get("weights")
    if expected is None:
        raise errors.InputError(f"'{art.path}' records no weight digests (compiled by an older qcompile): recompile it")
    found = _fingerprints(load_onnx(art.model_path), targets.of(art.manifest))
    problems = _problems(expected, found)
    report = {"artifact": str(art.path), "layers": len(found), "problems": problems}
    if against is not None:
        other = Artifact.load(against)
        theirs = digests(load_onnx(other.model_path), targets.of(other.manifest))
        problems += [f"against {other.path}: {p}" for p in _problems(theirs, found)]
        report["against"] = str(other.path)
        report["logits"] = compare_logits(art.model_path, other.model_path)
        if report["logits"]["argmax_agreement"] < MIN_ARGMAX_AGREEMENT:
            problems.append(f"argmax agreement {report['logits']['argmax_agreement']:.3f} < {MIN_ARGMAX_AGREEMENT} "
                            "on the same integers: a lowering changed the computation")
    report["passed"] = not problems
    return report
