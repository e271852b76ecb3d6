"""TensorRT engines from trt-* artifacts: `tensorrt` when installed (GPU machines), else TensorRT-RTX.

TensorRT-RTX (`pip install 'qcompile[tensorrt-rtx]'`) parses ONNX and builds an engine ahead of time on
a machine with no GPU; running or even deserialising the engine needs a CUDA driver. The engine gets
two optimisation profiles for the KV-cache decoder: 0 = prompt (1..max_prompt new tokens, empty cache)
and 1 = decode (1 new token after 0..max_length-1 cached ones).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import pathlib
import tempfile
import time

from qcompile import artifact, errors

ENGINE_FILE = "model.engine"


def tensorrt_module():
    """(module, name): the TensorRT Python package to build with."""
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return importlib.import_module(name), name
        except ImportError:
            continue
    raise errors.MissingDependencyError(
        "building an engine needs TensorRT: pip install 'qcompile[tensorrt-rtx]' (builds without a GPU) "
        "or install NVIDIA's tensorrt package on a GPU machine"
    )


@dataclasses.dataclass(frozen=True)
class Profiles:
    max_prompt: int = 512
    max_length: int = 2048
    opt_prompt: int = 128
    opt_length: int = 512

    def shapes(self, name: str, dims: tuple) -> list[tuple[tuple, tuple, tuple]]:
        """(min, opt, max) per profile for one network input."""
        if name in ("input_ids", "position_ids"):
            return [((1, 1), (1, self.opt_prompt), (1, self.max_prompt)), ((1, 1), (1, 1), (1, 1))]
        if name == "attention_mask":
            return [((1, 1), (1, self.opt_prompt), (1, self.max_prompt)), ((1, 1), (1, self.opt_length), (1, self.max_length))]
        if name.startswith("past_key_values."):
            heads, head_dim = dims[1], dims[3]
            empty = (1, heads, 0, head_dim)
            return [(empty, empty, empty),
                    (empty, (1, heads, self.opt_length - 1, head_dim), (1, heads, self.max_length - 1, head_dim))]
        raise errors.UnsupportedModelError(f"input '{name}' is not a KV-cache decoder input: export with `qcompile export`")


def build(path: str | pathlib.Path, profiles: Profiles = Profiles(), progress=None) -> dict:
    """Build `model.engine` inside the trt-* artifact at `path`; returns the manifest's engine record."""
    from qcompile import targets

    art = artifact.Artifact.load(path)
    if not targets.of(art.manifest).builds_engines:
        raise errors.InputError(f"'{art.path}' is not a TensorRT artifact: compile it with --target trt-int4, trt-int8 or trt-fp8")
    trt, package = tensorrt_module()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    advance = progress.task(f"Building the engine ({package})", 1) if progress else (lambda: None)
    started = time.perf_counter()
    if not parser.parse_from_file(str(art.model_path)):
        messages = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise errors.QcompileError(f"{package} cannot parse '{art.model_path}': {messages} "
                                   f"(run `qcompile check {art.path}` for the TensorRT rules)")
    config = builder.create_builder_config()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    per_input = {i.name: profiles.shapes(i.name, tuple(i.shape)) for i in inputs}
    for p in range(2):
        profile = builder.create_optimization_profile()
        for name, shapes in per_input.items():
            profile.set_shape(name, *shapes[p])
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise errors.QcompileError(f"{package} failed to build an engine for '{art.model_path}' (rerun with --debug)")
    seconds = round(time.perf_counter() - started, 1)
    data = memoryview(blob)
    fd, tmp = tempfile.mkstemp(prefix=".model.engine.", dir=art.path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    artifact.publish(pathlib.Path(tmp), art.path / ENGINE_FILE)
    advance()
    record = {"file": ENGINE_FILE, "builder": package, "version": trt.__version__, "build_seconds": seconds,
              "bytes": data.nbytes, "sha256": hashlib.sha256(data).hexdigest(),
              "profiles": {"prompt": {"max_new_tokens": profiles.max_prompt},
                           "decode": {"max_length": profiles.max_length}},
              "deserialized": can_deserialize(trt, bytes(data))}
    manifest = dict(art.manifest, engine=record)
    artifact.write_manifest_atomic(art.path, manifest)
    return record


def can_deserialize(trt, engine: bytes) -> bool | str:
    """True if the serialized `engine` deserialises here; a reason string where no usable CUDA device is."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR))
    validity, _ = runtime.get_engine_validity(engine[: runtime.engine_header_size])
    if validity != trt.EngineValidity.VALID:
        return f"not checked: {validity.name.lower()} on this machine (deserialising needs a supported GPU and CUDA driver)"
    return runtime.deserialize_cuda_engine(engine) is not None
