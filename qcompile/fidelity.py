"""Fidelity: every target stores the same quantized integers and scales, and we can prove it.

`decode` reads a linear's weight back from whichever form a target stored it in (canonical or TensorRT
DequantizeLinear, ORT MatMulNBits) into the canonical arrays: signed q [K, N] (or unsigned q with a zero
point; FP8 E4M3 bit patterns), float32 scales [G, N]. Scales repeated across all blocks of a column
(a per-channel weight spelled in blocks, as MatMulNBits must) decode as one block: same numbers, one
form. `digests` hashes them per linear; the compiler records the digests of the canonical model before
lowering, and `verify` checks an artifact against them (and against another
artifact: same integers, then both run through ONNX Runtime on the same prompt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors
from qcompile.analysis import Linear
from qcompile.targets.ort import _INT_TYPES

PROMPT = "The history of the city began in the early nineteenth century, when a group of settlers"
# Different kernels of the same weights may flip a few argmaxes: MatMulNBits at accuracy_level 4 rounds its
# input to int8 per block, so last-bit differences upstream (a fused norm or attention) change that rounding.
# Measured on SmolLM2's 17-token prompt: ort-int4 fused vs unfused, 15 of 17 agree at accuracy_level 4 (max
# |Δlogit| 2.8) and all 17 at accuracy_level 0 (max |Δlogit| 5e-5). A broken lowering agrees on almost none.
MIN_ARGMAX_AGREEMENT = 0.8


@dataclasses.dataclass
class Decoded:
    q: np.ndarray  # [K, N] int16: signed values, or unsigned codes when zero_point is set
    scale: np.ndarray  # [G, N] float32
    zero_point: np.ndarray | None  # [G, N] int16
    bits: int
    block_size: int
    tensor: str  # the initializer that holds the integers (named in error messages)
    fp8: bool = False  # q holds FLOAT8E4M3FN bit patterns

    def one_block_if_uniform(self) -> "Decoded":
        """A linear's weight whose every block of a column has the same scale (and zero point), or that has
        no block size (per-channel), as one block spanning K."""
        k = self.q.shape[0]
        same = np.all(self.scale == self.scale[:1]) and (
            self.zero_point is None or np.all(self.zero_point == self.zero_point[:1]))
        if same or self.block_size == 0:
            zp = None if self.zero_point is None else self.zero_point[:1]
            return dataclasses.replace(self, scale=self.scale[:1], zero_point=zp, block_size=k)
        return self

    def digest(self) -> str:
        kind = "fp8/" if self.fp8 else ""
        h = hashlib.sha256(f"{kind}{self.bits}/{self.block_size}/{list(self.q.shape)}".encode())
        for a in (self.q, self.scale, self.zero_point):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def decode(linear: Linear) -> Decoded | None:
    """The integers and scales of `linear` in canonical layout; None for a float weight."""
    node = linear.node
    if node.op_type == "MatMulNBits":
        decoded = _decode_nbits(node)
        if linear.columns is not None:  # one of a packed node's linears: its columns
            cols = slice(*linear.columns)
            zp = None if decoded.zero_point is None else decoded.zero_point[:, cols]
            decoded = dataclasses.replace(decoded, q=decoded.q[:, cols], scale=decoded.scale[:, cols], zero_point=zp)
        return decoded.one_block_if_uniform()
    dq = linear.weight_input.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    fp8 = dq.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN
    q = (_array(dq.inputs[0]).view(np.uint8) if fp8 else _array(dq.inputs[0])).astype(np.int16)
    pad = node.inputs[0].producer()
    if pad is not None and pad.op_type == "Pad":  # TensorRT's whole-block padding: padded rows must be 0
        extra = int(_array(pad.inputs[1])[-1])
        if np.any(q[q.shape[0] - extra:]):
            raise errors.InputError(f"{linear.name}: padded rows of {dq.inputs[0].name} are not zero")
        q = q[: q.shape[0] - extra]
    zp = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    bits = 8 if fp8 else _INT_TYPES[dq.inputs[0].dtype][0]
    scale = _array(dq.inputs[1]).astype(np.float32).reshape(-1, q.shape[1])  # per-channel [N] → [1, N]
    zp = None if zp is None else _array(zp).astype(np.int16).reshape(-1, q.shape[1])
    return Decoded(q, scale, zp, bits, dq.attributes.get_int("block_size", 0), dq.inputs[0].name, fp8).one_block_if_uniform()


def _decode_nbits(node: ir.Node) -> Decoded:
    a = node.attributes
    k, n, bits, block = (a[name].as_int() for name in ("K", "N", "bits", "block_size"))
    b = _array(node.inputs[1])
    groups = b.shape[1]
    codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, groups * block) if bits == 4 else b.reshape(n, -1)
    codes = codes[:, :k].T.astype(np.int16)  # [K, N]
    scale = _array(node.inputs[2]).reshape(n, groups).T.astype(np.float32)
    zp_value = node.inputs[3] if len(node.inputs) > 3 else None
    if zp_value is None:
        return Decoded(codes - 2 ** (bits - 1), scale, None, bits, block, node.inputs[1].name)
    zp = _array(zp_value)
    if bits == 4:
        zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
    return Decoded(codes, scale, zp[:, :groups].T.astype(np.int16), bits, block, node.inputs[1].name)


def decode_embedding(gather: ir.Node) -> Decoded | None:
    """A quantized embedding table's integers [V, H] and scales [V, G] (canonical or GatherBlockQuantized)."""
    if gather.op_type == "GatherBlockQuantized":
        a = gather.attributes
        bits, block = a["bits"].as_int(), a["block_size"].as_int()
        data = _array(gather.inputs[0])
        q = data.astype(np.int16) - (128 if data.dtype == np.uint8 else 0)
        return Decoded(q, _array(gather.inputs[2]).astype(np.float32), None, bits, block, gather.inputs[0].name)
    dq = gather.inputs[0].producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return Decoded(_array(dq.inputs[0]).astype(np.int16), _array(dq.inputs[1]).astype(np.float32), None,
                   _INT_TYPES[dq.inputs[0].dtype][0], dq.attributes.get_int("block_size", 0), dq.inputs[0].name)


def _decoded(model: ir.Model):
    """(name, Decoded) for every quantized linear (ModelMap names: 'blocks.3.q', 'lm_head') and the
    embedding table ('embedding') when it is quantized, decoded one at a time."""
    mm = analysis.analyze(model)
    for linear in mm.linears():
        decoded = decode(linear)
        if decoded is not None:
            yield linear.name, decoded
    embedding = decode_embedding(mm.embedding)
    if embedding is not None:
        yield "embedding", embedding


def decode_model(model: ir.Model) -> dict[str, Decoded]:
    """name → Decoded for every quantized weight (int16 integers: 2 bytes a weight, so prefer `digests`
    on big models)."""
    return dict(_decoded(model))


def _fingerprints(model: ir.Model) -> dict[str, tuple[str, str]]:
    """name → (digest, tensor holding the integers), holding one decoded weight at a time."""
    return {name: (d.digest(), d.tensor) for name, d in _decoded(model)}


def digests(model: ir.Model) -> dict[str, str]:
    """name → digest of every quantized weight, holding one decoded weight at a time."""
    return {name: digest for name, (digest, _) in _fingerprints(model).items()}


def compare_digests(expected: dict[str, str], model: ir.Model) -> list[str]:
    """Problems with `model`'s quantized weights against `expected` digests, one line each, naming the
    linear and the tensor; empty when bit-identical."""
    return _problems(expected, _fingerprints(model))


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


def verify(path: str | pathlib.Path, against: str | pathlib.Path | None = None) -> dict:
    """Check an artifact's weights against the digests its compile recorded and, with `against`, against
    another artifact's weights and logits. Returns the report; `report['passed']` is the verdict."""
    from qcompile.artifact import Artifact, load_onnx

    art = Artifact.load(path)
    expected = art.manifest.get("fidelity", {}).get("weights")
    if expected is None:
        raise errors.InputError(f"'{art.path}' records no weight digests (compiled by an older qcompile): recompile it")
    found = _fingerprints(load_onnx(art.model_path))
    problems = _problems(expected, found)
    report = {"artifact": str(art.path), "layers": len(found), "problems": problems}
    if against is not None:
        other = Artifact.load(against)
        problems += [f"against {other.path}: {p}" for p in _problems(digests(load_onnx(other.model_path)), found)]
        report["against"] = str(other.path)
        report["logits"] = compare_logits(art.model_path, other.model_path)
        if report["logits"]["argmax_agreement"] < MIN_ARGMAX_AGREEMENT:
            problems.append(f"argmax agreement {report['logits']['argmax_agreement']:.3f} < {MIN_ARGMAX_AGREEMENT} "
                            "on the same integers: a lowering changed the computation")
    report["passed"] = not problems
    return report
