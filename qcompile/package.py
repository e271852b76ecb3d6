"""Edge packages: a folder (and a zip of it) that an app loads as is with onnxruntime-genai.

Contents: model.onnx (+ model.onnx.data), tokenizer files, config.json, `genai_config.json`,
`golden.json` + `golden_logits.npy` (a prompt, its token ids, the first logits and the greedy
continuation, for checking a device port), and the manifest with the runtime versions it needs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shutil
import tempfile
import zipfile

import numpy as np

from qcompile import artifact, errors
from qcompile.runtime import Decoder, eos_token_ids, load_tokenizer

GOLDEN_PROMPT = "Once upon a time, in a small village by the sea,"
GOLDEN_TOKENS = 32
MIN_ONNXRUNTIME = "1.22"  # opset 21 blocked DequantizeLinear, MatMulNBits 4/8-bit with accuracy_level 4
MAX_LENGTH = 2048


def genai_config(folder: pathlib.Path) -> dict:
    """onnxruntime-genai's config for a qcompile KV-cache decoder in `folder` (reads its config.json)."""
    file = folder / "config.json"
    if not file.is_file():
        raise errors.InputError(f"no config.json in '{folder}': an edge package needs the model's HF config.json")
    hf = json.loads(file.read_text())
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    eos = sorted(eos_token_ids(folder)) or [0]
    context = int(hf.get("max_position_embeddings", MAX_LENGTH))
    return {
        "model": {
            "bos_token_id": hf.get("bos_token_id") or 0,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": hf.get("pad_token_id") if hf.get("pad_token_id") is not None else eos[0],
            "context_length": context,
            "vocab_size": hf["vocab_size"],
            # onnxruntime-genai's decoder-only class: qcompile's export has the same inputs and outputs for every
            # family and holds the whole computation (rotary, norms, softcaps, windows), so genai needs no family
            # of its own (and refuses families it does not list: olmo2, gpt_neox, falcon, stablelm, gpt2)
            "type": "llama",
            "decoder": {
                "session_options": {"log_id": "qcompile", "provider_options": []},
                "filename": "model.onnx",
                "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
                "hidden_size": hf["hidden_size"],
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": hf["num_hidden_layers"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "max_length": min(context, MAX_LENGTH), "min_length": 0, "do_sample": False, "top_k": 1, "top_p": 1.0,
            "temperature": 1.0, "repetition_penalty": 1.0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": False, "early_stopping": True, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
        },
    }


def golden_vectors(folder: pathlib.Path) -> tuple[dict, np.ndarray]:
    """The prompt, its ids, the greedy continuation (ids and text) and the first step's logits."""
    from qcompile.generation import generate

    decoder = Decoder(folder)
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(GOLDEN_PROMPT).ids
    logits, _ = decoder.forward(np.array([ids]), decoder.empty_cache(), 0)
    tokens = list(generate(decoder, ids, GOLDEN_TOKENS, stop_ids=eos_token_ids(folder)))
    golden = {"prompt": GOLDEN_PROMPT, "prompt_ids": ids, "greedy_ids": tokens,
              "greedy_text": tokenizer.decode(tokens), "first_logits": "golden_logits.npy"}
    return golden, logits[0, -1].astype(np.float32)


def write_edge_files(folder: pathlib.Path, name: str) -> dict:
    """Add genai_config.json and the golden vectors to a model folder (to be named `name`); returns the
    manifest's record."""
    (folder / "genai_config.json").write_text(json.dumps(genai_config(folder), indent=2))
    golden, logits = golden_vectors(folder)
    (folder / "golden.json").write_text(json.dumps(golden, indent=2))
    np.save(folder / "golden_logits.npy", logits)
    versions = {"min_onnxruntime": MIN_ONNXRUNTIME}
    for pkg in ("onnxruntime", "onnxruntime-genai"):
        try:
            versions[f"tested_{pkg.replace('-', '_')}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {**versions, "client": "onnxruntime-genai", "zip": f"{name}.zip"}


def genai_greedy(folder: pathlib.Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt_ids` by onnxruntime-genai, the package's client (`pip install
    'qcompile[edge]'`): what a device app loading the package would generate."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise errors.MissingDependencyError("running an edge package needs onnxruntime-genai: "
                                            "pip install 'qcompile[edge]'") from None
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def zip_folder(folder: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Zip `folder`'s files (flat) to `out`, atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as z:
            for p in sorted(folder.iterdir()):
                if p.is_file():
                    z.write(p, f"{out.stem}/{p.name}")
        artifact.publish(pathlib.Path(tmp), out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def package(path: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Make an edge package (folder + zip) from an ONNX Runtime artifact (one whose target `packages_edge`,
    which the caller checks); returns the folder."""
    art = artifact.Artifact.load(path)
    out = pathlib.Path(out) if out is not None else art.path.with_name(f"{art.path.name}-edge")
    if out.resolve() == art.path.resolve():
        raise errors.InputError("--out is the artifact itself: choose another folder")
    with artifact.atomic_folder(out) as tmp:
        for p in art.path.iterdir():
            if p.is_file() and p.name != artifact.MANIFEST:
                shutil.copy2(p, tmp / p.name)
        manifest = dict(art.manifest)
        manifest["package"] = write_edge_files(tmp, out.name)
        artifact.write_manifest(tmp, manifest)
    zip_folder(out, out.with_name(f"{out.name}.zip"))
    return out
