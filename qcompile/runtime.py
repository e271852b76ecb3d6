"""A thin ONNX Runtime wrapper for KV-cache decoders: prefill, decode steps, and model files."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import tempfile

import numpy as np

from qcompile import artifact, errors, experts


def model_file(path: str | pathlib.Path) -> pathlib.Path:
    """`model.onnx` inside an artifact/export folder, or the .onnx file itself."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise errors.SourceNotFoundError(f"'{path}' not found: pass a qcompile artifact folder or a .onnx file")
    return path


def load_tokenizer(folder: pathlib.Path):
    """The `tokenizers` tokenizer saved beside the model (tokenizer.json)."""
    import tokenizers

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise errors.InputError(
            f"no tokenizer.json beside the model in '{folder}': use a folder written by `qcompile export` "
            "or `qcompile model`, or copy the model's tokenizer.json there"
        )
    return tokenizers.Tokenizer.from_file(str(file))


def eos_token_ids(folder: pathlib.Path) -> set[int]:
    config = folder / "config.json"
    if not config.is_file():
        return set()
    eos = json.loads(config.read_text()).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _threads() -> int:
    """ONNX Runtime's threads per session: QCOMPILE_THREADS, else 0 (ORT's default, every core)."""
    value = os.environ.get("QCOMPILE_THREADS", "0")
    if not value.isdigit():
        raise errors.InputError(f"QCOMPILE_THREADS={value!r}: give a whole number of threads (0: every core)")
    return int(value)


def _recorded_session(model: pathlib.Path) -> dict:
    """The session config an artifact's manifest records for running it on the CPU (`Target.cpu_session`)."""
    manifest = model.parent / artifact.MANIFEST
    if not manifest.is_file():
        return {}
    return json.loads(manifest.read_text()).get("target", {}).get("cpu_session", {})


def _head_size(model: pathlib.Path) -> int | None:
    """The head size of a model whose cache inputs leave it symbolic (onnxruntime-genai's builder)."""
    config = model.parent / "genai_config.json"
    return json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.is_file() else None


_CACHE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
                "tensor(uint8)": np.uint8}


class Decoder:
    """An ORT session over a KV-cache decoder graph (qcompile's export signature)."""

    def __init__(self, path: str | pathlib.Path, session_config: dict | None = None):
        """`session_config`: ONNX Runtime session config entries; by default those the artifact's manifest records."""
        import onnxruntime as ort

        self.path = model_file(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = _threads()
        for key, value in (_recorded_session(self.path) if session_config is None else session_config).items():
            options.add_session_config_entry(key, str(value))
        try:  # a mixture of experts runs grouped per expert (`experts`): ORT has read the copy once the session exists
            with tempfile.TemporaryDirectory(prefix="qcompile-experts-") as tmp:
                grouped = experts.grouped_copy(self.path, pathlib.Path(tmp))
                self.session = ort.InferenceSession(str(grouped or self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise errors.CorruptModelError(
                f"ONNX Runtime cannot load '{self.path}': {str(e).splitlines()[0][:300]}"
            ) from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - set(inputs)
        if missing:
            raise errors.UnsupportedModelError(
                f"'{self.path}' lacks decoder inputs {sorted(missing)}: export it with `qcompile export`"
            )
        self.positions = "position_ids" in inputs  # absent from models whose attention op applies RoPE itself
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.cache_shapes = {n: inputs[n].shape for n in self.past_names}
        self.cache_types = {n: _CACHE_TYPES.get(inputs[n].type, np.float32) for n in self.past_names}
        vocab = next((o.shape[-1] for o in self.session.get_outputs() if o.name == "logits"), None)
        self.vocab_size = vocab if isinstance(vocab, int) else None  # None: unknown (or a calibration copy)
        self.head_dim = next((s[3] for s in self.cache_shapes.values() if isinstance(s[3], int)), None) or _head_size(self.path)

    def empty_cache(self, batch: int = 1, length: int = 0) -> dict[str, np.ndarray]:
        """Zeroed caches of `length` tokens, in each input's type (float, or a GroupQueryAttention's quantized
        cache: int8, or uint8 holding two 4-bit values, whose static last dim says so)."""
        return {n: np.zeros((batch, shape[1], length, shape[3] if isinstance(shape[3], int) else self.head_dim),
                            dtype=self.cache_types[n]) for n, shape in self.cache_shapes.items()}

    def feeds(self, ids: np.ndarray, cache: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
        """Inputs for `ids` [b, s] following `past_len` cached tokens."""
        batch, seq = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64)}
        if self.positions:
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
        return {**feeds, **cache}

    def forward(self, ids: np.ndarray, cache: dict[str, np.ndarray], past_len: int):
        """Run `ids` [b, s] after `past_len` cached tokens; returns (logits [b, s, vocab], new cache)."""
        out = self.session.run(["logits", *self.present_names], self.feeds(ids, cache, past_len))
        return out[0], dict(zip(self.past_names, out[1:]))

    @functools.cached_property
    def appends_in_place(self) -> bool:
        """Whether every present.* output is written by a GroupQueryAttention node, which appends to its
        cache in place when past and present are one buffer (ORT's CPU kernel compares the pointers)."""
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        writers = {out: node.op_type for node in graph.node for out in node.output}
        paired = {p.replace("past_key_values.", "present.", 1) for p in self.past_names} == set(self.present_names)
        return bool(self.present_names) and paired and all(writers.get(n) == "GroupQueryAttention" for n in self.present_names)

    def sequence(self, capacity: int) -> "Sequence":
        """A one-sequence decode of up to `capacity` tokens (prompt included) with the fastest cache handling."""
        return Sequence(self, capacity)


PREFILL_CHUNK = 512


class Sequence:
    """One sequence (batch 1): `prefill(ids)`, then `step(token)` per new token; both return the last
    position's logits [vocab].

    On graphs whose caches GroupQueryAttention writes (`Decoder.appends_in_place`: qcompile's fused ORT
    targets, onnxruntime-genai's models) the cache lives in two buffers per layer of `capacity` tokens,
    bound through IOBinding as both past and present: a step writes only the new token's keys and values
    where a plain run copies the whole past into a new present. Elsewhere it is `Decoder.forward` on a
    growing cache.
    """

    def __init__(self, decoder: Decoder, capacity: int):
        self.decoder, self.capacity, self.length = decoder, capacity, 0
        self.cache: dict[str, np.ndarray] = decoder.empty_cache()
        self.binding = None
        if decoder.appends_in_place:
            import onnxruntime as ort

            self.buffers = decoder.empty_cache(1, capacity)
            self.binding = decoder.session.io_binding()
            self.binding.bind_output("logits")  # first: the only output read back
            self.bound_tokens = 0
            for past in decoder.past_names:
                value = ort.OrtValue.ortvalue_from_numpy(self.buffers[past])
                self.binding.bind_ortvalue_input(past, value)
                self.binding.bind_ortvalue_output(past.replace("past_key_values.", "present.", 1), value)

    def prefill(self, ids, chunk: int = PREFILL_CHUNK) -> np.ndarray:
        """Run the prompt; with the in-place cache in chunks of `chunk` tokens, so that attention's
        transient scores stay [heads, chunk, length] however long the prompt is."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self._check(ids.shape[1])
        if self.binding is None:
            logits, self.cache = self.decoder.forward(ids, self.decoder.empty_cache(), 0)
            self.length = ids.shape[1]
            return logits[0, -1]
        for start in range(0, ids.shape[1], chunk):
            logits = self._run_bound(ids[:, start:start + chunk])
        return logits

    def step(self, token: int) -> np.ndarray:
        self._check(1)
        ids = np.array([[token]], dtype=np.int64)
        if self.binding is not None:
            return self._run_bound(ids)
        logits, self.cache = self.decoder.forward(ids, self.cache, self.length)
        self.length += 1
        return logits[0, -1].copy()

    def _run_bound(self, ids: np.ndarray) -> np.ndarray:
        """`ids` [1, s] appended to the bound cache in place; the last position's logits."""
        for name, value in self.decoder.feeds(ids, {}, self.length).items():
            self.binding.bind_cpu_input(name, value)
        if ids.shape[1] != self.bound_tokens:  # ORT reuses the logits it allocated only for the same shape
            self.binding.bind_output("logits")
            self.bound_tokens = ids.shape[1]
        self.decoder.session.run_with_iobinding(self.binding)
        self.length += ids.shape[1]
        return self.binding.get_outputs()[0].numpy()[0, -1].copy()  # a view of a buffer the next run reuses

    def _check(self, new: int) -> None:
        if self.length + new > self.capacity:
            raise errors.InputError(f"the sequence would hold {self.length + new} tokens, more than its capacity "
                                    f"{self.capacity}: ask for a larger capacity (or fewer new tokens)")
